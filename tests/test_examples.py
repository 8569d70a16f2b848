"""The example notebooks: committed without outputs, in step with their plain scripts, and executed end to end
(nbclient, real kernel) with the small settings of ``KVPACKET_EXAMPLE_FAST=1``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpacket_rag.models import default_model_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ("llamaindex_chatbot", "langchain_chatbot", "train_adapter", "benchmark_plots")
NEEDS = {"llamaindex_chatbot": ("llama_index.llms.kvpacket", "llama_index.vector_stores.faiss"),
         "langchain_chatbot": ("langchain_kvpacket",), "train_adapter": ("kvpacket_rag.training",), "benchmark_plots": ()}
CELL_TIMEOUT_S = 600


def _generator():
    spec = importlib.util.spec_from_file_location("example_notebooks", EXAMPLES / "notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_notebook_and_a_script():
    assert set(_generator().SCRIPTS) == set(NOTEBOOKS)
    for name in NOTEBOOKS:
        assert (EXAMPLES / f"{name}.py").is_file() and (EXAMPLES / f"{name}.ipynb").is_file()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs_and_matches_its_script(name):
    text = (EXAMPLES / f"{name}.ipynb").read_text(encoding="utf-8")
    notebook = json.loads(text)
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)
    assert text == _generator().notebook_of((EXAMPLES / f"{name}.py").read_text(encoding="utf-8")), (
        f"{name}.ipynb is out of step with {name}.py: run `python examples/notebooks.py`")


def test_generator_turns_markers_into_cells():
    cells = _generator().cells_of('"""doc"""\n# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n# %% [end]\nmain()\n')
    assert [c["cell_type"] for c in cells] == ["markdown", "code"]
    assert "".join(cells[0]["source"]) == "# Title\n\ntext" and "".join(cells[1]["source"]) == "x = 1"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """Environment for the kernels: fast settings, test threads, a fresh cache sharing only the converted model."""
    cache = tmp_path_factory.mktemp("kvpacket-cache")
    (cache / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
    return {"KVPACKET_CACHE": str(cache), "KVPACKET_EXAMPLE_FAST": "1", "HF_HUB_OFFLINE": "1",
            "KVPACKET_EXAMPLE_THREADS": os.environ.get("KVPACKET_TEST_THREADS", "2"),
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, example_env, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for module in NEEDS[name]:
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (./run.sh setup installs it)")
    for key, value in example_env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    # kernel specs often start plain `python`: make that this interpreter (e.g. ./run.sh's .venv, not activated)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name in ("llamaindex_chatbot", "langchain_chatbot"):
        assert "sources: tarnwick_creamery.txt" in text and "time to first token" in text
    if name == "train_adapter":
        assert "adapter written to" in text and "packets + adapter" in text


def _fake_benchmarks(root: Path) -> None:
    """One result of each kind the plots read, plus an unreadable file that must be skipped."""
    (root / "ttft").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "integrations").mkdir()
    runs = [{"chunks": 4, "chunk_tokens": t, "context_tokens": 4 * t, "speedup": t / 64,
             "methods": {"kv_packet": {"ttft_s": 0.05}, "full_recompute": {"ttft_s": t / 1280}}} for t in (128, 512)]
    (root / "ttft" / "cpu.json").write_text(json.dumps({"model": "m", "machine": {"threads": 1}, "runs": runs}))
    methods = {name: {"f1": f1, "fidelity": f1, "ttft_s": 0.1} for name, f1 in (("full_recompute", 0.6),
                                                                                  ("kv_packet", 0.5))}
    (root / "eval" / "biography.json").write_text(json.dumps({"dataset": "biography", "model": {"name": "m"},
                                                              "n": 3, "methods": methods}))
    frameworks = {"langchain": {"kv_packet": {"ttft_s": 0.3}, "plain_transformers": {"ttft_s": 4.0}}}
    (root / "integrations" / "ttft.json").write_text(json.dumps({"model": "m", "frameworks": frameworks}))
    (root / "eval" / "broken.json").write_text("{not json")


@pytest.mark.parametrize("kind", ["every kind", "none"])
def test_benchmark_plots_script_plots_what_exists_and_skips_the_rest(kind, tmp_path):
    benchmarks = tmp_path / "benchmarks"
    if kind == "every kind":
        _fake_benchmarks(benchmarks)
    env = {**os.environ, "KVPACKET_BENCHMARKS": str(benchmarks), "KVPACKET_PLOTS_DIR": str(tmp_path / "png"),
           "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "benchmark_plots.py")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "png").glob("*.png")) if (tmp_path / "png").exists() else []
    if kind == "every kind":
        assert written == ["f1_ttft_biography.png", "frameworks_ttft.png", "quality.png", "ttft_cpu.png"]
        assert "skipping" in done.stdout and "broken.json" in done.stdout
    else:
        assert written == [] and done.stdout.count("no ") >= 3


def test_redis_workers_example_second_worker_reads_every_packet(example_env):
    """Two worker processes over one real redis-server (started by the example): the second builds nothing."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; ./run.sh setup does it)")
    pytest.importorskip("redis")
    run = subprocess.run([sys.executable, str(EXAMPLES / "redis_workers.py")], env={**os.environ, **example_env},
                         capture_output=True, text=True, timeout=CELL_TIMEOUT_S)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "built 0" in run.stdout and "worker 2 read every packet worker 1 built" in run.stdout
    assert run.stdout.count("  A: ") == 2
