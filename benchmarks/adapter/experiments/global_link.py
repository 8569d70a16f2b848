"""Experiment: global link tokens computed at question time by a low-rank-updated model.

The packets stay those of a frozen packet adapter. At question time, ``K`` trained soft tokens are placed after
the last packet, before the question; they attend to the whole assembled context, and while they are computed
the model's attention projections carry low-rank updates (the same gated mechanism as the build-time LoRA). The
question and the answer are read by the unchanged model, which also attends to the link tokens' keys and values.
Question-time cost: ``K`` more tokens in the question's prefill. With ``--reader`` the updates apply to the
question and the answer as well (a reader adapter; ``--n-link 0`` leaves only that).

The script trains the link tokens and their updates by distillation on the cached teacher outputs of a training
run (its ``--data``/``--seed`` settings), and measures teacher-forced KL per token, with and without the link
tokens, on the same batches (paired, before each update) and on validation questions (test split, seed 1,
the full-recompute answer generated as in ``evaluate_adapter.py --kl-only``).

    python benchmarks/adapter/experiments/global_link.py --threads 2 --json runs/link/global_link.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpacket_rag.adapter import resolve_adapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.kvcache import KVBuffer, PacketCache, assemble
from kvpacket_rag.lora import BuildLoRA
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.training import TrainConfig, Trainer, tokenize_sample
from kvpacket_rag.training.teacher import teacher_answer
from kvpacket_rag.training import student_logits


def context_block(model, builder, preamble_block, chunk_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values ``[layers, kv_heads, T, head_dim]`` of the preamble and the packets, assembled."""
    packets = builder.build_many([list(c) for c in chunk_ids])
    cache = assemble(KVBuffer(model), [preamble_block] + [(p.keys, p.values) for p in packets], model.rope)
    return cache.to_block()


def tail_logits(model, block, link: torch.Tensor | None, lora: BuildLoRA | None, tail_ids: list[int],
                n_logits: int, reader: bool = False) -> torch.Tensor:
    """Logits of the last ``n_logits`` tail positions after ``[link tokens]`` over the assembled context.

    ``reader``: the low-rank updates apply to every tail position (link tokens, question and answer), not only to
    the link tokens."""
    keys, values = block
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer][None], values[layer][None], layer)
    embeds = model.embed(torch.tensor(tail_ids, dtype=torch.long))
    n_link = 0 if link is None else link.shape[0]
    if n_link:
        embeds = torch.cat([link.to(embeds.dtype), embeds])
    start = keys.shape[2]
    positions = torch.arange(start, start + embeds.shape[0])[None]
    gate = torch.zeros(1, embeds.shape[0], 1)
    gate[:, : embeds.shape[0] if reader else n_link] = 1.0
    context = lora.applied(model, gate) if (lora is not None and gate.any()) else contextlib.nullcontext()
    with context:
        out = model.model(inputs_embeds=embeds[None], position_ids=positions, past_key_values=cache, use_cache=True,
                          logits_to_keep=n_logits)
    return out.logits[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="default", help="frozen packet adapter")
    parser.add_argument("--n-link", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reader", action="store_true",
                        help="apply the low-rank updates to the question and answer too (a reader adapter)")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--lr", type=float, default=1e-2, help="link tokens")
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--seed", type=int, default=4, help="training draw (the teacher cache of that run)")
    parser.add_argument("--val", nargs="+", default=["biography:5:50", "hotpotqa::30"],
                        help="NAME:DOCS:N validation sets (test split, seed 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = TrainConfig(out=Path("runs/link/unused.safetensors"), data="biography:0.35,hotpotqa:0.35,niah:0.3",
                         data_options={"biography": {"docs_per_sample": [3, 4, 5]},
                                       "niah": {"n_chunks": 4, "chunk_words": 300}},
                         max_chunks=6, samples=args.samples, batch_size=args.batch_size, seed=args.seed, answer_cap=32,
                         teacher_top_k=256, prefix="preamble", teacher_cache=Path("runs/teacher"), threads=args.threads,
                         progress=False, lora_rank=8)
    trainer = Trainer(config)
    trainer.prepare()
    model, formatter = trainer.model, PromptFormatter(trainer.model.tokenizer)
    for p in model.model.parameters():
        p.requires_grad_(False)
    adapter = resolve_adapter(model, args.adapter)
    builder = PacketBuilder(model, adapter, formatter)
    preamble_ids = formatter.preamble_ids()
    preamble_cache = PacketCache(KVBuffer(model), 0)
    with torch.no_grad():
        model.model.model(input_ids=torch.tensor([preamble_ids]), position_ids=torch.arange(len(preamble_ids))[None],
                          cache=preamble_cache, use_cache=True)
    preamble_block = preamble_cache.to_block()

    soft = torch.cat([adapter.trailer, adapter.header]).detach().float()  # the trailer first: it ends every packet
    link = torch.nn.Parameter(soft.repeat(-(-args.n_link // soft.shape[0]), 1)[: args.n_link].clone())
    link_or_none = link if args.n_link else None
    lora = BuildLoRA.initialize(model, args.rank, 16.0, tuple(args.targets.split(",")), seed=0)
    optimizer = torch.optim.AdamW([{"params": [link], "lr": args.lr, "peak": args.lr},
                                   {"params": list(lora.parameters()), "lr": args.lora_lr, "peak": args.lora_lr}],
                                  weight_decay=0.0)

    # sanity: without link tokens the cached-context path equals the trainer's student
    sample, teacher = trainer.samples[0], trainer.teacher[0]
    with torch.no_grad():
        block = context_block(model, builder, preamble_block, sample.chunk_ids)
        tail = list(sample.suffix_ids) + teacher.answer_ids[:-1].tolist()
        mine = tail_logits(model, block, None, None, tail, teacher.length)
        theirs = student_logits(model, adapter, preamble_ids, sample, teacher.answer_ids)
    sanity = float((mine - theirs).abs().max())
    print(f"no-link path vs block-mask student: max |diff| {sanity:.2e}", flush=True)

    log, total_steps, step = [], args.epochs * -(-len(trainer.samples) // args.batch_size), 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(trainer.samples), generator=torch.Generator().manual_seed(args.seed * 7 + epoch)).tolist()
        for first in range(0, len(order), args.batch_size):
            batch = order[first:first + args.batch_size]
            tokens = sum(trainer.teacher[i].length for i in batch)
            with_link = without = 0.0
            for i in batch:
                sample, teacher = trainer.samples[i], trainer.teacher[i]
                with torch.no_grad():
                    block = context_block(model, builder, preamble_block, sample.chunk_ids)
                tail = list(sample.suffix_ids) + teacher.answer_ids[:-1].tolist()
                with torch.no_grad():
                    without += float(teacher.kl(tail_logits(model, block, None, None, tail, teacher.length)).sum())
                loss = teacher.kl(tail_logits(model, block, link_or_none, lora, tail, teacher.length,
                                              args.reader)).sum() / tokens
                loss.backward()
                with_link += float(loss.detach()) * tokens
            for group in optimizer.param_groups:
                group["lr"] = group["peak"] * (1 - step / total_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "epoch": epoch, "link": with_link / tokens, "none": without / tokens,
                        "elapsed_s": round(time.perf_counter() - start, 1)})
            print(json.dumps(log[-1]), flush=True)

    results = {"sanity_max_abs_diff": sanity, "args": vars(args) | {"json": str(args.json)}, "train": log,
               "validation": {}}
    stop = eos_ids(model.tokenizer, model.config)
    for spec in args.val:
        name, docs, n = spec.split(":")
        options = {"docs_per_sample": int(docs)} if docs else {}
        samples = load_samples(name, "test", int(n), seed=1, **options)
        sums = {"link": 0.0, "none": 0.0}
        count = 0
        for s in samples:
            tokenized = tokenize_sample(s, formatter, model, adapter.n_header + adapter.n_trailer, 32)
            with torch.no_grad():
                full = teacher_answer(model, tokenized.prompt_ids(preamble_ids), 32, stop)
                block = context_block(model, builder, preamble_block, tokenized.chunk_ids)
                tail = list(tokenized.suffix_ids) + full.answer_ids[:-1].tolist()
                for key, (lk, lr_) in {"link": (link_or_none, lora), "none": (None, None)}.items():
                    sums[key] += float(full.kl(tail_logits(model, block, lk, lr_, tail, full.length,
                                                           args.reader)).sum())
            count += full.length
        results["validation"][spec] = {k: v / count for k, v in sums.items()} | {"tokens": count}
        print(spec, results["validation"][spec], flush=True)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    half = len(log) // 2
    print("train, second half: link", statistics.mean(e["link"] for e in log[half:]),
          "none", statistics.mean(e["none"] for e in log[half:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
