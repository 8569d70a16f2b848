"""Keep each example notebook in step with its plain script.

Every ``examples/<name>.py`` with ``# %%`` cell markers is the source of ``examples/<name>.ipynb``: a
``# %% [markdown]`` cell becomes a markdown cell (its ``# `` comment prefixes removed), any other ``# %%`` cell
a code cell. Notebooks are written without outputs.

    python examples/notebooks.py            # regenerate every notebook
    python examples/notebooks.py --check    # exit 1 if a notebook differs from its script (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
SCRIPTS = ("llamaindex_chatbot", "langchain_chatbot", "train_adapter", "benchmark_plots")
_KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def cells_of(script: str) -> list[dict]:
    """Notebook cells of a ``# %%``-marked script (text before the first marker is skipped: it is the
    script's module docstring and ``__main__`` plumbing lives after ``# %% [end]``)."""
    cells: list[dict] = []
    kind, lines = None, []

    def flush() -> None:
        if kind is None or kind == "end":
            return
        while lines and not lines[-1].strip():
            lines.pop()
        if kind == "markdown":
            text = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
            cells.append({"cell_type": "markdown", "metadata": {}, "source": _join(text)})
        else:
            cells.append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                          "source": _join(lines)})

    for line in script.splitlines():
        if line.startswith("# %%"):
            flush()
            marker = line[4:].strip()
            kind = "markdown" if marker == "[markdown]" else "end" if marker == "[end]" else "code"
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def _join(lines: list[str]) -> list[str]:
    return [line + "\n" for line in lines[:-1]] + lines[-1:]


def notebook_of(script: str) -> str:
    """The ``.ipynb`` JSON text (nbformat 4.5, no outputs) of a script."""
    cells = cells_of(script)
    for n, cell in enumerate(cells):
        cell["id"] = f"cell-{n}"
    notebook = {"cells": cells, "metadata": {"kernelspec": _KERNEL, "language_info": {"name": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report notebooks out of step; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name in SCRIPTS:
        expected = notebook_of((EXAMPLES / f"{name}.py").read_text(encoding="utf-8"))
        path = EXAMPLES / f"{name}.ipynb"
        if path.is_file() and path.read_text(encoding="utf-8") == expected:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(expected, encoding="utf-8")
    if args.check and stale:
        print(f"out of step with their scripts: {', '.join(stale)}; run `python examples/notebooks.py`",
              file=sys.stderr)
        return 1
    if not args.check and stale:
        print(f"wrote {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
