"""The adapter designs of every frontier run on the validation questions, gathered into one table and one plot.

``designs.json`` names the designs (what each changed, its adapter file, its demo result) and, per frontier run
file in this folder, which design each of its method names was when it ran. The table lists every design's
training wall time (the stage alone, teacher pass included, from the adapter's card) and the demo's count of
correct answers through packets, then every (set, run, design) row: fidelity, KL, KL against bare packets of
the same run, recall, F1 and TTFT against full recompute of the same run. Rows of one run share questions and a
clock; compare designs within a run.

    python benchmarks/quality/gather.py          # writes frontier_all.md and frontier_all.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvpacket_rag.evaluation.plots import labelled_panels

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETS = ("biography", "hotpotqa", "niah", "squad")


def design_rows(designs: dict) -> list[str]:
    lines = ["| design | what changed | training wall time | demo, correct of 8 |", "|---|---|---|---|"]
    for name, design in designs.items():
        wall = "—"
        if "adapter" in design:
            card = json.loads((ROOT / design["adapter"]).with_suffix(".json").read_text())
            wall = f"{card['wall_time_s'] / 60:.0f} min ({card['steps']} steps)"
        demo = "—"
        if "demo" in design:
            demo = str(json.loads((ROOT / design["demo"]).read_text())["kv_packet"])
        lines.append(f"| {name} | {design['what']} | {wall} | {demo} |")
    return lines


def result_rows(runs: dict) -> list[dict]:
    """One dict per (set, run, design): the run's figures for that design."""
    rows = []
    for run, names in runs.items():
        results = json.loads((HERE / run).read_text())["results"]
        for dataset, methods in results.items():
            bare = methods.get("no_recompute", {}).get("kl")
            for method, design in names.items():
                if method in methods:
                    r = methods[method]
                    rows.append({"set": dataset, "n": methods["_n"], "run": run, "design": design, **r,
                                 "kl_vs_bare": r["kl"] / bare if bare and r["kl"] is not None else None})
    return sorted(rows, key=lambda r: (SETS.index(r["set"]) if r["set"] in SETS else len(SETS), r["run"]))


def table(rows: list[dict]) -> list[str]:
    lines = ["| set (n) | run | design | fidelity | KL | KL × bare | recall | F1 | TTFT × full |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "—" if r["kl_vs_bare"] is None else f"{r['kl_vs_bare']:.2f}×"
        lines.append(f"| {r['set']} ({r['n']}) | {r['run'].removesuffix('.json')} | {r['design']} | {r['fidelity']:.3f} "
                     f"| {r['kl']:.4f} | {ratio} | {r['recall']:.2f} | {r['f1']:.3f} | {r['ttft_vs_full']:.3f} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Fidelity against KL, one panel per set, every (run, design) a labelled point."""
    sets = [s for s in SETS if any(r["set"] == s for r in rows)]
    panels = {dataset: [(f"{r['design']} ({r['n']})", r["kl"], r["fidelity"]) for r in rows if r["set"] == dataset]
              for dataset in sets}
    labelled_panels(panels, "KL to full recompute per token (log)", "fidelity (F1 vs full-recompute answer)", path)


def main() -> int:
    catalog = json.loads((HERE / "designs.json").read_text())
    rows = result_rows(catalog["runs"])
    text = ["# The designs of every frontier run on the validation questions", "",
            "Written by `python benchmarks/quality/gather.py` from the frontier runs named in `designs.json` (test "
            "split, seed 1; each run's command, machine and date are in its JSON). Compare designs within one run: "
            "rows of a run answer the same questions on one clock.", "", *design_rows(catalog["designs"]), "",
            *table(rows), ""]
    (HERE / "frontier_all.md").write_text("\n".join(text))
    plot(rows, HERE / "frontier_all.png")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
