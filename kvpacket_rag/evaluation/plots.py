"""PNG plots of one evaluation result (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

SWEEPS = ("cacheblend", "epic")


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, stem: str | Path) -> list[Path]:
    """Write ``<stem>_f1_ttft.png`` and, when a sweep has a setting, ``<stem>_f1_recompute.png``
    (each with F1 on the left and fidelity to full recompute on the right).

    Returns:
        The paths written.
    """
    stem = Path(stem)
    written = [f1_vs_ttft(result, stem.with_name(stem.name + "_f1_ttft.png"))]
    if any(name.partition(":")[0] in SWEEPS for name in result["methods"]):
        written.append(f1_vs_recompute(result, stem.with_name(stem.name + "_f1_recompute.png")))
    return written


def _title(result: dict) -> str:
    return f"{result['dataset']} · {result['model']['name']} · n={result['n']}"


METRICS = (("f1", "F1 (micro)"), ("fidelity", "fidelity (F1 vs full-recompute answer)"))


def f1_vs_ttft(result: dict, path: Path) -> Path:
    """One point per method/setting: median TTFT (log scale) against F1 (left) and fidelity (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for ax, (metric, label) in zip(axes, METRICS):
        for name, m in result["methods"].items():
            if m[metric] is None:
                continue
            ax.scatter(m["ttft_s"] * 1e3, m[metric], s=30)
            ax.annotate(name, (m["ttft_s"] * 1e3, m[metric]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT, median (ms, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _finish(plt, fig, result, path)


def f1_vs_recompute(result: dict, path: Path) -> Path:
    """F1 (left) and fidelity (right) against the share of full-recompute context FLOPs, one line per sweep."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    methods = result["methods"]
    for ax, (metric, label) in zip(axes, METRICS):
        for family in SWEEPS:
            points = sorted((m["flops_vs_full"], m[metric], name) for name, m in methods.items()
                            if name.partition(":")[0] == family and m[metric] is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
                for x, y, name in points:
                    ax.annotate(name.partition(":")[2], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        for name, style in (("full_recompute", "-"), ("kv_packet", "--"), ("no_recompute", ":"), ("closed_book", "-.")):
            if name in methods and methods[name][metric] is not None:
                ax.axhline(methods[name][metric], linestyle=style, color="grey", linewidth=1)
                ax.annotate(name, (1.0, methods[name][metric]), fontsize=7, ha="right", va="bottom", color="grey")
        ax.set_xlabel("recompute share (context FLOPs / full recompute)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _finish(plt, fig, result, path)


def labelled_panels(panels: dict[str, list[tuple[str, float, float]]], xlabel: str, ylabel: str,
                    path: Path) -> Path:
    """One panel per title in ``panels``, each ``(label, x, y)`` a labelled point, x on a log scale; writes
    ``path`` (PNG) and returns it. Used to compare designs across frontier runs (e.g. fidelity against TTFT
    or KL)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels.items()):
        for label, x, y in points:
            ax.scatter(x, y, s=18)
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _finish(plt, fig, result: dict, path: Path) -> Path:
    """Title ``fig`` with the run, write it to ``path`` and free it."""
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
