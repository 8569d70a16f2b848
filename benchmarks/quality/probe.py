"""Quality probe of adapter variants on a validation draw: fidelity, KL, recall, F1 and TTFT ratio.

Each variant is ``NAME=ADAPTER``: ``none`` (bare packets), ``default`` (the shipped adapter) or an adapter
file, optionally followed by ``+preamble`` to build that adapter's packets after the chat preamble instead
(a training-free change of the packet prefix). Every variant answers through the product path
(`kvpacket_rag.evaluation.harness.evaluate`, kv_packet against full recompute in the same run).

The questions are a validation draw (test split, seed 1 by default), disjoint from the reported questions
of ``benchmarks/RESULTS.md`` (seed 0): tuning decisions are taken here, never on the reported questions.

Example:
    python benchmarks/quality/probe.py --sets biography hotpotqa --n 30 --threads 2 \\
        --variants bare=none bare+pre=none+preamble shipped=default \\
        --json benchmarks/quality/probe_prefix.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvpacket_rag.adapter import PREFIX_PREAMBLE, PacketAdapter
from kvpacket_rag.benchmarks.common import machine_info
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.engine import PacketEngine, resolve_adapter
from kvpacket_rag.evaluation.harness import EvalConfig, evaluate
from kvpacket_rag.models import load_model
from kvpacket_rag.tuning import set_threads, tune_malloc

FIELDS = ("fidelity", "kl", "recall", "f1", "ttft_vs_full")


def variant_adapter(model, spec: str) -> PacketAdapter:
    """The adapter of a variant spec (``none``, ``default`` or a path, with an optional ``+preamble``)."""
    base, _, prefix = spec.partition("+")
    adapter = resolve_adapter(model, base)
    if prefix:
        adapter = adapter.with_prefix(prefix)
    return adapter


def run_variant(model, spec: str, dataset: str, n: int, seed: int, max_new_tokens: int) -> dict:
    engine = PacketEngine(model, adapter=variant_adapter(model, spec))
    samples = load_samples(dataset, "test", n, seed)
    result = evaluate(engine, samples, EvalConfig(("kv_packet",), max_new_tokens=max_new_tokens, progress=False))
    full, packet = result["methods"]["full_recompute"], result["methods"]["kv_packet"]
    return {"full": {k: full[k] for k in ("recall", "f1", "ttft_s")},
            **{k: packet[k] for k in FIELDS}, "ttft_s": packet["ttft_s"]}


def table(results: dict) -> str:
    lines = ["| variant | set | fidelity | KL | recall (full) | F1 (full) | TTFT × full |", "|---|---|---|---|---|---|---|"]
    for name, per_set in results.items():
        for dataset, r in per_set.items():
            lines.append(f"| {name} | {dataset} | {r['fidelity']:.3f} | {r['kl']:.4f} | {r['recall']:.2f} "
                         f"({r['full']['recall']:.2f}) | {r['f1']:.3f} ({r['full']['f1']:.3f}) | {r['ttft_vs_full']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", required=True, help="NAME=ADAPTER[+preamble] ...")
    parser.add_argument("--sets", nargs="+", default=["biography", "hotpotqa"])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1, help="validation draw (the reported questions use seed 0)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True, help="output JSON; the table goes beside it (.md)")
    args = parser.parse_args(argv)
    tune_malloc()
    threads = set_threads(args.threads)
    model = load_model()
    results = json.loads(args.json.read_text())["results"] if args.json.is_file() else {}
    for variant in args.variants:
        name, _, spec = variant.partition("=")
        for dataset in args.sets:
            if dataset in results.get(name, {}):
                continue
            start = time.perf_counter()
            results.setdefault(name, {})[dataset] = {**run_variant(model, spec, dataset, args.n, args.seed,
                                                                    args.max_new_tokens), "spec": spec}
            r = results[name][dataset]
            print(f"{name} {dataset}: fidelity {r['fidelity']:.3f} KL {r['kl']:.4f} recall {r['recall']:.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            payload = {"command": " ".join(["python", *sys.argv]), "machine": machine_info(threads), "n": args.n,
                       "seed": args.seed, "max_new_tokens": args.max_new_tokens, "results": results}
            args.json.write_text(json.dumps(payload, indent=1) + "\n")
            args.json.with_suffix(".md").write_text(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
