"""Training speed: the per-chunk packet student against the one-forward block-mask student.

Both compute the same loss and gradients (the training tests check it); this measures what one training sample
costs with each (forward and backward of the KL on the teacher's answer, the shipped adapter's soft tokens and
build-time low-rank updates), on samples of the shipped recipe's mixture, alternating the two students per sample.
Medians over samples and repeats; the ratio is measured in the same run.

Example:
    python benchmarks/adapter/student_speed.py --samples 12 --repeats 3 --threads 2 \\
        --json benchmarks/adapter/student_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvpacket_rag.adapter import resolve_adapter
from kvpacket_rag.benchmarks.common import machine_info
from kvpacket_rag.training import TrainConfig, Trainer
from kvpacket_rag.training.student import block_student_logits, preamble_block, student_logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-cache", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = TrainConfig(out=Path("unused.safetensors"), data="biography:0.35,hotpotqa:0.35,niah:0.3",
                         data_options={"biography": {"docs_per_sample": [3, 4, 5]},
                                       "niah": {"n_chunks": 4, "chunk_words": 300}},
                         max_chunks=6, samples=args.samples, seed=4, answer_cap=32, teacher_top_k=256,
                         prefix="preamble", teacher_cache=args.teacher_cache, threads=args.threads, progress=False)
    trainer = Trainer(config)
    trainer.prepare()
    model = trainer.model
    for parameter in model.model.parameters():
        parameter.requires_grad_(False)
    adapter = resolve_adapter(model, "default")
    for parameter in adapter.parameters():
        parameter.requires_grad_(True)
    students = {
        "block mask (one forward)": lambda s, a: block_student_logits(model, adapter, trainer.preamble_ids, s, a),
        "packet path (per chunk)": lambda s, a: student_logits(model, adapter, trainer.preamble_ids, s, a,
                                                               preamble_block(model, trainer.preamble_ids)),
    }
    times: dict[str, list[float]] = {name: [] for name in students}
    ratios = []
    for _ in range(args.repeats):
        for sample, teacher in zip(trainer.samples, trainer.teacher):
            once = {}
            for name, student in students.items():
                start = time.perf_counter()
                teacher.kl(student(sample, teacher.answer_ids)).sum().backward()
                once[name] = time.perf_counter() - start
                adapter.zero_grad(set_to_none=True)
                times[name].append(once[name])
            ratios.append(once["block mask (one forward)"] / once["packet path (per chunk)"])
    tokens = [sum(len(c) for c in s.chunk_ids) for s in trainer.samples]
    result = machine_info(args.threads) | {
        "samples": args.samples, "repeats": args.repeats, "context_tokens_median": statistics.median(tokens),
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "speedup_median": statistics.median(ratios), "times_s": times}
    print(f"| student | s per sample (median of {len(ratios)}) |\n|---|---|")
    for name, value in result["median_s"].items():
        print(f"| {name} | {value:.2f} |")
    print(f"speed-up of the packet path (median of per-sample ratios): {result['speedup_median']:.2f}x; "
          f"context tokens per sample (median): {result['context_tokens_median']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
