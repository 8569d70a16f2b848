"""How far full recompute's own answers move under a change that carries no information: bfloat16 weights.

Fidelity (token F1 of an answer against full recompute's answer) and teacher-forced KL per token are the
quality measures of every reuse method. This script measures them for full recompute itself, run in bfloat16
against the float32 reference, on the same kind of questions: a method whose KL is at the bfloat16 level
cannot be told from full recompute by numerics alone, and the fidelity bfloat16 reaches is what a method
with that KL can expect. Greedy answers of at most 24 tokens (the harness's setting), CPU.

Example:
    python benchmarks/quality/noise_floor.py --sets biography:5:30 hotpotqa::30 --threads 2 \\
        --json benchmarks/quality/noise_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvpacket_rag.benchmarks.common import machine_info
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.metrics import best_f1
from kvpacket_rag.models import load_model
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.training import tokenize_sample
from kvpacket_rag.training.teacher import teacher_answer


@torch.no_grad()
def compare(reference_model, other_model, prompt_ids: list[int], cap: int, stop: set[int]) -> dict:
    """Fidelity of ``other_model``'s greedy answer to ``reference_model``'s, and its teacher-forced KL sum."""
    reference = teacher_answer(reference_model, prompt_ids, cap, stop)
    other = teacher_answer(other_model, prompt_ids, cap, stop)
    ids = prompt_ids + reference.answer_ids[:-1].tolist()
    logits = other_model.model(input_ids=torch.tensor([ids]), logits_to_keep=reference.length).logits[0]
    decode = reference_model.tokenizer.decode
    reference_text = decode(reference.answer_ids, skip_special_tokens=True).strip()
    other_text = decode(other.answer_ids, skip_special_tokens=True).strip()
    return {"fidelity": best_f1(other_text, [reference_text]), "kl_sum": float(reference.kl(logits).sum()),
            "tokens": reference.length, "same": other_text == reference_text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["biography:5:30", "hotpotqa::30"],
                        help="NAME:DOCS:N question sets (test split, seed --seed; DOCS empty for the default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reference, other = load_model(dtype="float32"), load_model(dtype="bfloat16")
    formatter = PromptFormatter(reference.tokenizer)
    preamble, stop = formatter.preamble_ids(), eos_ids(reference.tokenizer, reference.config)
    started, rows = time.perf_counter(), {}
    print("| set | n | fidelity (bf16 vs fp32) | identical answers | KL per token |\n|---|---|---|---|---|")
    for spec in args.sets:
        name, docs, n = spec.split(":")
        options = {"docs_per_sample": int(docs)} if docs else {}
        results = []
        for sample in load_samples(name, "test", int(n), seed=args.seed, **options):
            tokenized = tokenize_sample(sample, formatter, reference, 0, args.max_new_tokens)
            results.append(compare(reference, other, tokenized.prompt_ids(preamble), args.max_new_tokens, stop))
        row = {"n": len(results), "fidelity": statistics.mean(r["fidelity"] for r in results),
               "identical": statistics.mean(r["same"] for r in results),
               "kl": sum(r["kl_sum"] for r in results) / sum(r["tokens"] for r in results), "questions": results}
        rows[spec] = row
        print(f"| {spec} | {row['n']} | {row['fidelity']:.3f} | {row['identical']:.2f} | {row['kl']:.4f} |", flush=True)
    if args.json is not None:
        meta = machine_info(args.threads) | {"wall_s": round(time.perf_counter() - started, 1)}
        args.json.write_text(json.dumps(meta | {"seed": args.seed, "max_new_tokens": args.max_new_tokens,
                                                "sets": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
