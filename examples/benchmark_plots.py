"""Plots of the committed benchmark results under benchmarks/ (JSON written by the benchmark scripts).

Run: ``python examples/benchmark_plots.py`` (the notebook benchmark_plots.ipynb holds the same cells). Set
``KVPACKET_PLOTS_DIR=DIR`` to also save the figures as PNG files. Results that are not there are skipped.
"""

# %% [markdown]
# # Benchmark plots
#
# Every benchmark script writes a JSON file (with the exact command, machine, threads and date) and a
# markdown table under `benchmarks/`. This notebook reads whatever results are committed and plots them:
#
# 1. **Time to first token against context length**: KV packets vs full recompute (`kvpacket bench ttft`).
# 2. **Answer quality per method** on biography, HotpotQA and needle-in-a-haystack (`benchmarks/eval/run.sh`):
#    F1, and fidelity to the full-recompute answer (SmolLM2-135M is weak, so compare methods with each other,
#    not with large-model numbers).
# 3. **Quality against time to first token**, one point per method.
# 4. **Framework TTFT**: LlamaIndex and LangChain through packets vs a plain transformers LLM.
#
# A result that has not been produced yet is reported and skipped.

# %%
import json
import os
from pathlib import Path

import matplotlib.pyplot as plt


def find_benchmarks() -> Path | None:
    """The repository's ``benchmarks/`` directory: ``$KVPACKET_BENCHMARKS`` or the nearest one above the cwd."""
    if os.environ.get("KVPACKET_BENCHMARKS"):
        return Path(os.environ["KVPACKET_BENCHMARKS"])
    for folder in [Path.cwd(), *Path.cwd().parents]:
        if (folder / "benchmarks").is_dir() and (folder / "kvpacket_rag").is_dir():
            return folder / "benchmarks"
    return None


def load_results(root: Path | None) -> dict[str, dict]:
    """Every readable JSON result under ``root`` by relative path (unreadable files are reported, not fatal)."""
    results = {}
    for path in sorted(root.rglob("*.json")) if root is not None else []:
        try:
            results[str(path.relative_to(root))] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}")
    return results


SAVE_DIR = Path(os.environ["KVPACKET_PLOTS_DIR"]) if os.environ.get("KVPACKET_PLOTS_DIR") else None


def finish(fig, name: str) -> None:
    """Show the figure (and save it to ``$KVPACKET_PLOTS_DIR`` when set)."""
    fig.tight_layout()
    if SAVE_DIR is not None:
        SAVE_DIR.mkdir(parents=True, exist_ok=True)
        fig.savefig(SAVE_DIR / f"{name}.png", dpi=120)
    plt.show()
    plt.close(fig)


BENCHMARKS = find_benchmarks()
results = load_results(BENCHMARKS)
print(f"{len(results)} result files under {BENCHMARKS}:")
for name in results:
    print("  ", name)

# %% [markdown]
# ## 1. Time to first token against context length

# %%
ttft_runs = {name: r for name, r in results.items()  # sweeps that timed kv_packet against full recompute
             if isinstance(r.get("runs"), list) and all("context_tokens" in run and "speedup" in run for run in r["runs"])}
if not ttft_runs:
    print("no TTFT sweep yet: run `kvpacket bench ttft --json benchmarks/ttft/<name>.json`")
for name, result in ttft_runs.items():
    runs = sorted(result["runs"], key=lambda run: run["context_tokens"])
    tokens = [run["context_tokens"] for run in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("full_recompute", "o-"), ("kv_packet", "s-")):
        ax.plot(tokens, [run["methods"][method]["ttft_s"] * 1e3 for run in runs], style, label=method)
    for x, run in zip(tokens, runs):
        ax.annotate(f"{run['speedup']:.0f}x", (x, run["methods"]["kv_packet"]["ttft_s"] * 1e3),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    machine = result.get("machine", {})
    ax.set(xlabel="context tokens", ylabel="TTFT (ms, median)", yscale="log",
           title=f"{result.get('model', '?')}, {machine.get('threads', '?')} thread(s), {machine.get('cpu', '')}")
    ax.grid(alpha=0.3)
    ax.legend()
    finish(fig, "ttft_" + Path(name).stem)

# %% [markdown]
# ## 2. Answer quality per method

# %%
quality = {name: r for name, r in results.items()
           if isinstance(r.get("methods"), dict) and "dataset" in r
           and all(isinstance(m, dict) and "f1" in m for m in r["methods"].values())}
HEADLINE = ("full_recompute", "kv_packet", "no_recompute", "closed_book", "cacheblend:0.15", "epic:32")
if not quality:
    print("no quality results yet: run `benchmarks/eval/run.sh` (or `kvpacket eval --json benchmarks/eval/<dataset>.json`)")
else:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(quality)
    methods = [m for m in HEADLINE if any(m in r["methods"] for r in quality.values())]
    for n, (name, result) in enumerate(quality.items()):
        for ax, metric in zip(axes, ("f1", "fidelity")):
            values = [(result["methods"].get(m) or {}).get(metric) or 0.0 for m in methods]
            ax.bar([i + n * width for i in range(len(methods))], values, width, label=result["dataset"])
    for ax, metric in zip(axes, ("F1 against the gold answers", "fidelity: F1 against the full-recompute answer")):
        ax.set_xticks([i + width * (len(quality) - 1) / 2 for i in range(len(methods))], methods, rotation=30,
                      ha="right")
        ax.set(ylim=(0, 1), title=metric)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    finish(fig, "quality")

# %% [markdown]
# ## 3. Quality against time to first token

# %%
for name, result in quality.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, m in result["methods"].items():
        if m.get("f1") is None or not m.get("ttft_s"):
            continue
        ax.scatter(m["ttft_s"] * 1e3, m["f1"], s=30)
        ax.annotate(method, (m["ttft_s"] * 1e3, m["f1"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    model = result.get("model")
    model = model.get("name") if isinstance(model, dict) else model
    ax.set(xscale="log", xlabel="TTFT (ms, median, log scale)", ylabel="F1",
           title=f"{result['dataset']} · {model} · n={result.get('n', '?')}")
    ax.grid(alpha=0.3)
    finish(fig, "f1_ttft_" + Path(name).stem)

# %% [markdown]
# ## 4. Framework TTFT: LlamaIndex and LangChain

# %%
frameworks = {name: r for name, r in results.items() if isinstance(r.get("frameworks"), dict)}
if not frameworks:
    print("no framework results yet: run `python integrations/benchmark_ttft.py --out benchmarks/integrations/ttft`")
for name, result in frameworks.items():
    names = list(result["frameworks"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, (key, label) in enumerate((("plain_transformers", "plain LLM, full prompt"),
                                           ("kv_packet", "through KV packets"))):
        values = [result["frameworks"][f].get(key, {}).get("ttft_s", 0.0) * 1e3 for f in names]
        bars = ax.bar([i + offset * 0.4 for i in range(len(names))], values, 0.4, label=label)
        ax.bar_label(bars, fmt="%.0f ms", fontsize=8)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names)
    ax.set(ylabel="TTFT (ms, median)",
           title=f"{result.get('model', '?')}, ~{result.get('context_tokens', '?')} context tokens, "
                 f"top-{result.get('k', '?')}")
    ax.legend(fontsize=8)
    finish(fig, "frameworks_" + Path(name).stem)

# %% [end]
