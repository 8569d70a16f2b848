"""Held-out KL and fidelity split by where the gold answer sits: in the first chunk or in a later one.

Reads the per-question records of the reported runs (stage 10: ``benchmarks/eval/<set>_shipped.json``; stage 9:
``experiments/stage9_eval/<set>_stage9.json``), finds the first chunk of each question's context that contains
its gold answer (case-insensitive), and writes one table: per set, stage and method, the questions whose answer
is in the first chunk (read exactly under ``kv_packet_first_exact``) against those whose answer is in a later
chunk. No model runs.

    python benchmarks/adapter/experiments/kl_by_answer_chunk.py   # writes kl_by_answer_chunk.md beside it
"""

from __future__ import annotations

import json
from pathlib import Path

from kvpacket_rag.datasets import load_samples

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SETS = {"biography": 100, "squad": 100, "hotpotqa": 30}
RUNS = {"stage 10": "benchmarks/eval/{set}_shipped.json",
        "stage 9": "benchmarks/adapter/experiments/stage9_eval/{set}_stage9.json"}
METHODS = ("kv_packet_first_exact", "kv_packet", "no_recompute")


def answer_chunk(chunks: tuple[str, ...], answers: tuple[str, ...]) -> str:
    """``"first"``, ``"later"`` or ``"none"``: the first chunk that contains the gold answer."""
    answer = answers[0].lower() if answers else ""
    where = [i for i, chunk in enumerate(chunks) if answer and answer in chunk.lower()]
    return "none" if not where else "first" if where[0] == 0 else "later"


def summary(records: list[dict]) -> str:
    kl = sum(r["kl_sum"] for r in records) / sum(r["kl_tokens"] for r in records)
    fidelity = sum(r["fidelity"] for r in records) / len(records)
    return f"{fidelity:.3f} · {kl:.4f}"


def main() -> int:
    lines = ["| set | stage | method | answer in the first chunk: n, fidelity · KL | answer in a later chunk |",
             "|---|---|---|---|---|"]
    for dataset, n in SETS.items():
        where = {s.id: answer_chunk(s.chunks, s.answers) for s in load_samples(dataset, "test", n, 0)}
        for stage, pattern in RUNS.items():
            methods = json.loads((ROOT / pattern.format(set=dataset)).read_text())["methods"]
            for method in METHODS:
                if method == "no_recompute" and stage != "stage 10":
                    continue  # the same bare packets in both runs
                groups = {"first": [], "later": []}
                for record in methods[method]["records"]:
                    if where[record["id"]] in groups:  # "none": no chunk holds the gold answer verbatim
                        groups[where[record["id"]]].append(record)
                lines.append(f"| {dataset} ({n}) | {stage if method != 'no_recompute' else '—'} | {method} | "
                             f"{len(groups['first'])}, {summary(groups['first'])} | "
                             f"{len(groups['later'])}, {summary(groups['later'])} |")
    text = "\n".join(["# Held-out KL by where the answer is", "",
                      "Written by `python benchmarks/adapter/experiments/kl_by_answer_chunk.py` from the reported runs "
                      "(test split, seed 0); fidelity · KL per token.", "", *lines, ""])
    (HERE / "kl_by_answer_chunk.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
