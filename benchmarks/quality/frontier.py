"""Quality frontier of adapter designs: fidelity, KL, recall, F1 and TTFT ratio per variant and dataset.

Every variant is ``NAME=ADAPTER``: ``none`` (bare packets), ``default`` (the shipped adapter) or an adapter
file, optionally with ``+preamble`` (its packets built after the chat preamble instead of from position 0) and
then ``@first-exact`` (the first chunk read from its exact packet, as the ``kv_packet_first_exact`` method does).
All variants and baselines answer the same questions in one harness run per dataset
(`kvpacket_rag.evaluation.harness.evaluate`: the product path, full recompute as the reference, packets built
before timing), so their fidelity, KL and TTFT ratios share one reference and one clock.

The questions are a validation draw (test split, seed 1 by default), disjoint from the reported questions of
``benchmarks/RESULTS.md`` (seed 0): design decisions are taken here. ``squad`` is the unseen domain: no
adapter is trained on it.

Example:
    python benchmarks/quality/frontier.py --sets biography:30 hotpotqa:20 niah:20 squad:30 --threads 2 \\
        --variants bare+preamble=none+preamble paper=benchmarks/adapter/candidates/smollm2-135m-instruct-stage3.safetensors \\
        shipped=default --baselines no_recompute cacheblend:0.15 --json benchmarks/quality/frontier.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvpacket_rag.benchmarks.common import machine_info, split_first_exact
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.adapter import resolve_adapter
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.evaluation.harness import EvalConfig, evaluate
from kvpacket_rag.evaluation.plots import labelled_panels
from kvpacket_rag.methods import PacketMethod
from kvpacket_rag.models import load_model
from kvpacket_rag.tuning import set_threads, tune_malloc

FIELDS = ("fidelity", "kl", "recall", "f1", "ttft_vs_full", "ttft_s")
FIDELITY = "fidelity (F1 vs full-recompute answer)"


def variant_method(model, variant: str) -> PacketMethod:
    """``NAME=ADAPTER[+preamble][@first-exact]`` as a packet method named ``NAME`` (``@first-exact``: the first
    chunk read from its exact packet, as ``kv_packet_first_exact`` does)."""
    name, _, spec = variant.partition("=")
    path, exact_first = split_first_exact(spec)
    return PacketMethod(adapter=resolve_adapter(model, path), name=name, exact_first=exact_first)


def run_set(model, spec: str, methods: list, seed: int, max_new_tokens: int) -> dict:
    dataset, _, n = spec.partition(":")
    samples = load_samples(dataset, "test", int(n or 30), seed)
    engine = PacketEngine(model)
    result = evaluate(engine, samples, EvalConfig(tuple(methods), max_new_tokens=max_new_tokens, progress=True))
    return {name: {k: summary[k] for k in FIELDS} for name, summary in result["methods"].items()} | {
        "_n": len(samples)}


def table(results: dict) -> str:
    lines = ["| set (n) | method | fidelity | KL | recall | F1 | TTFT × full |", "|---|---|---|---|---|---|---|"]
    for dataset, methods in results.items():
        for name, r in methods.items():
            if name.startswith("_"):
                continue
            kl = "—" if r["kl"] is None else f"{r['kl']:.4f}"
            lines.append(f"| {dataset} ({methods['_n']}) | {name} | {r['fidelity']:.3f} | {kl} | {r['recall']:.2f} "
                         f"| {r['f1']:.3f} | {r['ttft_vs_full']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Fidelity against TTFT (fraction of full recompute), one panel per dataset."""
    panels = {f"{dataset} ({methods['_n']} questions)": [(name, r["ttft_vs_full"], r["fidelity"])
                                                          for name, r in methods.items() if not name.startswith("_")]
              for dataset, methods in results.items()}
    labelled_panels(panels, "TTFT × full recompute", FIDELITY, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", required=True, help="NAME=ADAPTER[+preamble][@first-exact] ...")
    parser.add_argument("--baselines", nargs="*", default=["no_recompute"], help="other methods, e.g. cacheblend:0.15")
    parser.add_argument("--sets", nargs="+", default=["biography:30", "hotpotqa:20"], help="DATASET[:N] ...")
    parser.add_argument("--seed", type=int, default=1, help="validation draw (the reported questions use seed 0)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True, help="output JSON; the table (.md) and plot (.png) beside it")
    args = parser.parse_args(argv)
    tune_malloc()
    threads = set_threads(args.threads)
    model = load_model()
    methods = [variant_method(model, v) for v in args.variants] + list(args.baselines)
    payload = json.loads(args.json.read_text()) if args.json.is_file() else {"results": {}}
    for spec in args.sets:
        dataset = spec.partition(":")[0]
        if dataset in payload["results"]:
            continue  # delete the JSON to measure again
        start = time.perf_counter()
        payload["results"][dataset] = run_set(model, spec, methods, args.seed, args.max_new_tokens)
        payload.update(command=" ".join(["python", *sys.argv]), machine=machine_info(threads), seed=args.seed,
                       max_new_tokens=args.max_new_tokens, variants=args.variants)
        payload.setdefault("wall_s", {})[dataset] = round(time.perf_counter() - start, 1)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
        args.json.with_suffix(".md").write_text(table(payload["results"]))
        plot(payload["results"], args.json.with_suffix(".png"))
        print(table({dataset: payload["results"][dataset]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
