"""Build the results page from evaluation JSON files.

Usage:
    python -m kvpacket_rag.evaluation.report benchmarks/eval/*.json --notes benchmarks/eval/notes.md \\
        --out benchmarks/RESULTS.md

Each JSON file is one `kvpacket eval` run. The page has a headline table, the issue's acceptance targets
checked per dataset (met / missed, with the numbers), then every run's header (exact command, model,
adapter, machine, threads, date), tables and plots. ``--notes`` inserts a hand-written file verbatim.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..rag import PACKET_READINGS
from .harness import REFERENCE
from .table import LEGEND, breakdown_rows, header, quality_rows

HEADLINE = ("no_recompute", "kv_packet", "kv_packet_first_exact", "cacheblend:0.15", "epic:32", "closed_book")
F1_FLOOR = 0.3
F1_RATIO = {"biography": 0.95}
DEFAULT_F1_RATIO = 0.90


def load_results(paths: list[str | Path]) -> list[tuple[Path, dict]]:
    """Read evaluation JSON files (sorted by dataset, then path).

    Raises:
        ValueError: a file is not a `kvpacket eval` result.
    """
    results = []
    for path in map(Path, paths):
        data = json.loads(path.read_text())
        if not str(data.get("format", "")).startswith("kvpacket-eval/"):
            raise ValueError(f"{path} is not a `kvpacket eval --json` result")
        results.append((path, data))
    return sorted(results, key=lambda item: (item[1]["dataset"], str(item[0])))


def _fmt(value, spec=".3f") -> str:
    return "–" if value is None else format(value, spec)


def headline(results: list[tuple[Path, dict]], metric: str = "f1") -> list[str]:
    """One row per run with kv_packet: ``metric`` per headline method; F1 gets its ratio to full recompute,
    fidelity its KL."""
    names = [REFERENCE] + [n for n in HEADLINE if any(n in r["methods"] for _, r in results)]
    lines = ["| dataset (n) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for _, result in results:
        if "kv_packet" not in result["methods"]:
            continue  # a sweep of recompute settings: in its own section
        cells = []
        for name in names:
            m = result["methods"].get(name)
            if m is None or m[metric] is None:
                cells.append("–")
            elif metric == "f1":
                cells.append(f"{m['f1']:.3f}" + ("" if name == REFERENCE else f" ({_fmt(m['f1_vs_full'], '.2f')}×)"))
            elif metric == "fidelity":
                cells.append(f"{m[metric]:.3f}" + (f" (KL {m['kl']:.3f})" if m.get("kl") is not None else ""))
            else:
                cells.append(f"{m[metric]:.3f}")
        lines.append(f"| {label(result)} | " + " | ".join(cells) + " |")
    return lines


def label(result: dict) -> str:
    """``dataset (n)``, plus the packet precision when it is not full, the adapter's short fingerprint when the run
    used one (runs of different adapters share the page) and the chunk order when it is not the dataset's."""
    parts = [str(result["n"])]
    quantization = result.get("quantization", "none")
    if quantization != "none":
        parts.append(f"{quantization} packets")
    fingerprint = (result.get("adapter") or {}).get("fingerprint", "none")
    if fingerprint != "none":
        parts.append(f"adapter {fingerprint[:8]}")
    if result.get("order", "dataset") != "dataset":
        parts.append(f"{result['order']} order")
    return f"{result['dataset']} ({', '.join(parts)})"


def targets(result: dict, others: Sequence[dict] = ()) -> list[tuple[str, bool | None, str]]:
    """The acceptance targets of the issue for one result, for each packet reading (`PACKET_READINGS`) it ran:
    (target, met (None: not applicable), numbers).

    ``others``: further runs on the same dataset (sweeps at fewer questions) whose CacheBlend/EPIC settings
    count in the TTFT target too, compared as ratios to the full recompute of their own session.
    """
    if REFERENCE not in result["methods"]:
        return []
    return [check for name in PACKET_READINGS if name in result["methods"] for check in _targets(result, name, others)]


def _targets(result: dict, name: str, others: Sequence[dict]) -> list[tuple[str, bool | None, str]]:
    m = result["methods"]
    kv, bare, full = m[name], m.get("no_recompute"), m[REFERENCE]
    checks = [(f"{name} fidelity ≥ 0.85", kv["fidelity"] >= 0.85, f"{kv['fidelity']:.3f}")]
    if bare is not None and kv["kl"] is not None and bare["kl"] is not None:
        checks.append((f"{name} KL ≤ 0.2 × no_recompute KL", kv["kl"] <= 0.2 * bare["kl"],
                       f"{kv['kl']:.4f} vs 0.2 × {bare['kl']:.4f} = {0.2 * bare['kl']:.4f}"))
    ratio = F1_RATIO.get(result["dataset"], DEFAULT_F1_RATIO)
    if full["f1"] is not None and kv["f1"] is not None:
        applies = full["f1"] >= F1_FLOOR
        checks.append((f"{name} F1 ≥ {ratio:.2f} × full (when full F1 ≥ {F1_FLOOR})",
                       kv["f1"] >= ratio * full["f1"] if applies else None,
                       f"{kv['f1']:.3f} vs {ratio:.2f} × {full['f1']:.3f} = {ratio * full['f1']:.3f}"
                       + ("" if applies else f" (full F1 < {F1_FLOOR}: not applicable)")))
    recompute = [(n, s) for run in (result, *others) for n, s in run["methods"].items()
                 if n.partition(":")[0] in ("cacheblend", "epic")]
    if recompute:  # compared as ratios to the full recompute of each method's own session (same clock)
        fastest, quickest = min(recompute, key=lambda item: item[1]["ttft_vs_full"])
        checks.append((f"{name} TTFT < every CacheBlend/EPIC setting",
                       kv["ttft_vs_full"] < quickest["ttft_vs_full"],
                       (f"{kv['ttft_vs_full']:.3f} × full ({kv['ttft_s'] * 1e3:.0f} ms) vs fastest {fastest} "
                        f"{quickest['ttft_vs_full']:.3f} × full ({quickest['ttft_s'] * 1e3:.0f} ms)")))
    blend = m.get("cacheblend:0.15")
    if blend is not None:
        checks.append((f"{name} fidelity ≥ cacheblend:0.15 fidelity", kv["fidelity"] >= blend["fidelity"],
                       f"{kv['fidelity']:.3f} vs {blend['fidelity']:.3f}"))
        if kv["kl"] is not None and blend["kl"] is not None:
            checks.append((f"{name} KL ≤ cacheblend:0.15 KL", kv["kl"] <= blend["kl"],
                           f"{kv['kl']:.4f} vs {blend['kl']:.4f}"))
    checks.append((f"{name} context FLOPs ≤ 1e-3 × full", kv["flops"] <= 1e-3 * full["flops"],
                   f"{kv['flops_vs_full']:.1e} × full"))
    return checks


def target_rows(results: list[tuple[Path, dict]]) -> list[str]:
    lines = ["| dataset | target | met | numbers |", "|---|---|---|---|"]
    for _, result in results:
        if result.get("quantization", "none") != "none":
            continue  # a precision study of kv_packet, not the method as shipped
        others = [r for _, r in results if r is not result and r["dataset"] == result["dataset"]]
        for name, met, numbers in targets(result, others):
            mark = "n/a" if met is None else ("met" if met else "**missed**")
            lines.append(f"| {label(result)} | {name} | {mark} | {numbers} |")
    return lines


def _links(path: Path, out_dir: Path) -> list[str]:
    stem = path.with_suffix("")
    pngs = [stem.with_name(stem.name + suffix) for suffix in ("_f1_ttft.png", "_f1_recompute.png")]
    return [f"![{png.stem}]({os.path.relpath(png, out_dir)})" for png in pngs if png.is_file()]


def render(results: list[tuple[Path, dict]], notes: str = "", out_dir: Path = Path(".")) -> str:
    """The whole results page as markdown."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    files = " ".join(os.path.relpath(p, Path.cwd()) for p, _ in results)
    lines = ["# Evaluation results", "",
             (f"Generated {now} by `python -m kvpacket_rag.evaluation.report {files} ...` from the JSON files of "
              "`kvpacket eval` runs (one per section below, each with its exact command). Do not edit by hand."), "",
             "## Headline: F1 (ratio to full recompute)", "", *headline(results), "",
             "## Headline: fidelity to full recompute (teacher-forced KL, nats/token)", "",
             *headline(results, "fidelity"), "",
             "## Headline: answer recall (gold answer contained in the answer)", "", *headline(results, "recall"), "",
             "## Acceptance targets", "", *target_rows(results), ""]
    if notes.strip():
        lines += ["## Notes", "", notes.strip(), ""]
    for path, result in results:
        lines += [f"## {result['dataset']} — `{os.path.relpath(path, out_dir)}`", "", header(result), "",
                  *quality_rows(result), "", "TTFT breakdown (median ms):", "", *breakdown_rows(result), "",
                  *_links(path, out_dir), ""]
    lines += ["## Legend", "", LEGEND]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpacket_rag.evaluation.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="`kvpacket eval --json` files")
    parser.add_argument("--notes", default=None, help="markdown file inserted verbatim under 'Notes'")
    parser.add_argument("--out", default=None, help="write the page here (default: stdout); plot links are relative to it")
    args = parser.parse_args(argv)
    notes = Path(args.notes).read_text() if args.notes else ""
    out_dir = Path(args.out).parent if args.out else Path.cwd()
    page = render(load_results(args.results), notes, out_dir)
    if args.out:
        Path(args.out).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
