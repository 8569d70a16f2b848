"""Key/value error of stage 10's packets against bare packets on the first training samples.

For the first ``--n`` samples of the draw of the key/value-loss runs (seed 7, stage 10's mixture), prints the
answer KL, the context KL and `kv_match_error` of stage 10's packets (first chunk exact; stage 10 was the shipped
adapter when the key/value loss was introduced, and every key/value-loss run starts from it), and the
error of bare packets built after the preamble. Teacher outputs come from ``--teacher-cache`` (computed when
missing).

    python benchmarks/adapter/experiments/kv_error_probe.py --n 5 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.training import TrainConfig, Trainer

STAGE10 = "benchmarks/adapter/candidates/smollm2-135m-instruct-stage10.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-cache", default="runs/teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"biography": {"docs_per_sample": [3, 4, 5]}, "niah": {"n_chunks": 4, "chunk_words": 300}}
    config = TrainConfig(out="runs/kv-probe/unused.safetensors", data="biography:0.35,hotpotqa:0.35,niah:0.3",
                         data_options=options, max_chunks=6, samples=192, batch_size=8, seed=7, answer_cap=32,
                         teacher_top_k=256, teacher_cache=args.teacher_cache, prefix="preamble", lora_rank=8,
                         exact_first=True, context_tokens=128, kv_weight=1.0, progress=False)
    trainer = Trainer(config)
    trainer.prepare()
    stage10 = PacketAdapter.load(STAGE10, trainer.model)
    bare = PacketAdapter.initialize(trainer.model, 0, 0, prefix="preamble")
    print("| sample | chunks | answer KL | context KL | key/value error | bare packets |")
    print("|---|---|---|---|---|---|")
    for i in range(args.n):
        sample, teacher, context = trainer.samples[i], trainer.teacher[i], trainer.context_teacher[i]
        with torch.no_grad():
            answer, context_logits, error = trainer._student_logits(stage10, sample, teacher, context)
            *_, bare_error = trainer._student_logits(bare, sample, teacher, context)
        context_kl = f"{float(context.kl(context_logits).mean()):.4f}" if context is not None else "—"
        print(f"| {sample.id} | {len(sample.chunk_ids)} | {float(teacher.kl(answer).mean()):.4f} | {context_kl} | "
              f"{float(error):.4f} | {float(bare_error):.4f} |")


if __name__ == "__main__":
    main()
