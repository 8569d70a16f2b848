"""Package shape: what installs, typing markers, the public API, and no import cycle inside the package."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import kvpacket_rag

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvpacket_rag"
INTEGRATIONS = [ROOT / "integrations" / "langchain-kvpacket" / "langchain_kvpacket",
                ROOT / "integrations" / "llama-index-llms-kvpacket" / "llama_index" / "llms" / "kvpacket"]


def test_only_kvpacket_rag_installs_and_training_has_its_own_import_name():
    if tomllib is not None:
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["kvpacket_rag*"]
        assert {"redis", "plot", "training"} <= set(project["project"]["optional-dependencies"])
        assert not any(d.startswith(("redis", "matplotlib")) for d in project["project"]["dependencies"])
    assert not (ROOT / "training" / "__init__.py").exists()
    assert (PACKAGE / "training" / "__init__.py").is_file()
    assert (ROOT / "training" / "recipes" / "smollm2_default.py").is_file()


def test_every_package_is_typed_and_licensed():
    for package in [PACKAGE, *INTEGRATIONS]:
        assert (package / "py.typed").is_file(), package
    assert "MIT License" in (ROOT / "LICENSE").read_text()


def test_public_api_covers_the_names_of_the_readme_and_examples():
    for name in kvpacket_rag.__all__:
        assert hasattr(kvpacket_rag, name), name
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "examples").glob("*.py"))]
    used = {name.strip() for text in texts for names in re.findall(r"from kvpacket_rag import \(?([^)\n]+)", text)
            for name in names.split(",") if name.strip().isidentifier()}
    assert used and used <= set(kvpacket_rag.__all__)
    for name in ("PacketEngine", "PacketIndex", "open_store", "Document", "GenerationConfig"):
        assert name in kvpacket_rag.__all__


def _imports(path: Path, module: str) -> set[str]:
    """Modules of ``kvpacket_rag`` that ``path`` imports at run time (anywhere, TYPE_CHECKING blocks excepted)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("kvpacket_rag")}


def test_no_import_cycle_inside_the_package():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}
    # a package's __init__ re-exporting its modules is not a cycle with them
    graph = {name: {m for m in targets if not name.startswith(m + ".")} for name, targets in graph.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
