"""Two `kvpacket eval` results' methods on the questions both answered: fidelity · KL · recall, KL × bare.

    python benchmarks/adapter/experiments/compare_eval.py NEW.json:kv_packet_first_exact \\
        benchmarks/eval/biography_shipped.json:kv_packet_first_exact

Each side is ``FILE:METHOD``. Full recompute's answers must be the same in both files (same reference); the bare
packets (``no_recompute``) of either file give the KL ratio. Prints one markdown row per side and on how many
questions the first side's KL is lower.
"""

from __future__ import annotations

import argparse
import json


def records(spec: str) -> tuple[dict, list[dict]]:
    path, method = spec.split(".json:", 1)  # method names may hold a colon (cacheblend:0.15)
    result = json.load(open(path + ".json"))
    return result, result["methods"][method]["records"]


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"fidelity": sum(r["fidelity"] for r in rows) / n, "recall": sum(r["recall"] for r in rows) / n,
            "kl": sum(r["kl_sum"] for r in rows) / sum(r["kl_tokens"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    args = parser.parse_args()
    (result_a, a), (result_b, b) = records(args.first), records(args.second)
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    if [r["id"] for r in a] != [r["id"] for r in b]:
        raise SystemExit("the two results answered different questions")
    reference = [(r["id"], r.get("prediction_sha")) for r in result_a["methods"]["full_recompute"]["records"][:n]]
    if reference != [(r["id"], r.get("prediction_sha")) for r in result_b["methods"]["full_recompute"]["records"][:n]]:
        raise SystemExit("full recompute answered differently in the two results")
    bare_source = next((r for r in (result_a, result_b) if "no_recompute" in r["methods"]), None)
    bare = summary(bare_source["methods"]["no_recompute"]["records"][:n])["kl"] if bare_source else None
    print(f"{n} questions; bare packets' KL {bare:.4f}" if bare else f"{n} questions")
    print("| side | fidelity · KL · recall | KL × bare |\n|---|---|---|")
    for spec, rows in ((args.first, a), (args.second, b)):
        s = summary(rows)
        ratio = f"{s['kl'] / bare:.3f}" if bare else "—"
        print(f"| {spec} | {s['fidelity']:.3f} · {s['kl']:.4f} · {s['recall']:.2f} | {ratio} |")
    lower = sum(x["kl_sum"] / x["kl_tokens"] < y["kl_sum"] / y["kl_tokens"] for x, y in zip(a, b))
    print(f"KL lower on {lower} / {n} for the first")


if __name__ == "__main__":
    main()
