"""How close can any context-independent packet come to full recompute? An oracle on training samples.

A packet is one fixed tensor per chunk, so the best a packet can do under squared error is the mean of the chunk's
keys and values over the contexts it is read in. For the first ``--n`` samples of a training draw (stage 11's
mixture, seed ``--seed``) and every chunk read as a packet under the default reading (every chunk but the first),
this script runs the chunk plain after the preamble and ``--contexts`` random contexts (as many chunks as precede it in the sample, drawn from
other samples of the same dataset), rotates its keys back to the place right after the preamble, and averages them: the *mean
packet*. It then compares, against the chunk's keys and values in the sample's own context (full recompute's):

- key/value error (relative squared error per layer, averaged over layers, keys and values, as
  `kvpacket_rag.training.student.kv_match_error`) of bare packets built after the preamble, the adapter's packets,
  and mean packets;
- the spread of the random contexts around their mean (unbiased): the part of the error no fixed packet removes;
- teacher-forced answer KL per token (teacher outputs from ``--teacher-cache``) with the first chunk exact and
  the others read from each kind of packet.

    python benchmarks/adapter/experiments/kv_floor_probe.py --n 12 --contexts 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.training import TrainConfig, Trainer
from kvpacket_rag.training.student import Block, _plain_after, _rotate, packet_blocks, read_tail


def relative_error(got: list[Block], want: list[Block]) -> float:
    """`kv_match_error`'s measure: squared error summed over chunks per layer over the reference's squares."""
    err_k = sum((g[0] - w[0]).pow(2).sum((1, 2, 3)) for g, w in zip(got, want))
    err_v = sum((g[1] - w[1]).pow(2).sum((1, 2, 3)) for g, w in zip(got, want))
    norm_k = sum(w[0].pow(2).sum((1, 2, 3)) for w in want)
    norm_v = sum(w[1].pow(2).sum((1, 2, 3)) for w in want)
    return float(((err_k / norm_k).mean() + (err_v / norm_v).mean()) / 2)


def chunk_after(trainer: Trainer, before: list[list[int]], ids: list[int]) -> Block:
    """Keys/values of chunk ``ids`` read plainly after ``preamble | before``, keys moved to the place right after
    the preamble (the frame packets are built in)."""
    model, preamble = trainer.model, trainer.preamble
    flat = [t for chunk in before for t in chunk]
    keys, values = _plain_after(model, preamble, flat + ids)
    at = preamble[0].shape[2] + len(flat)
    return _rotate(keys[:, :, at:], -len(flat), model), values[:, :, at:]


def nearest_passages(trainer: Trainer, pool: dict[str, list[tuple[int, list[int]]]],
                     k: int) -> dict[tuple[int, ...], list[list[int]]]:
    """For every passage of the pool, its ``k`` nearest other passages of the same dataset (cosine of the default
    embedder's vectors), as a retriever would co-retrieve them with it."""
    from kvpacket_rag.embedder import Embedder

    embedder, near = Embedder(), {}
    for items in pool.values():
        unique = list({tuple(c): c for _, c in items}.values())
        vectors = torch.from_numpy(embedder.embed([trainer.model.tokenizer.decode(c) for c in unique]))
        scores = vectors @ vectors.T
        scores.fill_diagonal_(-2.0)
        for row, ids in zip(scores.topk(min(k, len(unique) - 1), dim=1).indices.tolist(), unique):
            near[tuple(ids)] = [unique[j] for j in row]
    return near


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--contexts", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-cache", default="runs/teacher")
    parser.add_argument("--json", default=None)
    parser.add_argument("--readings", nargs="*", default=[],
                        help="extra mean packets DEPTH:K[:other|:near]: DEPTH 'm' (as many chunks as precede it) "
                             "or a number of context chunks, K contexts, 'other' to draw them from the other "
                             "datasets, 'near' from the chunk's --near nearest passages of the same dataset (any "
                             "sample, by embedding)")
    parser.add_argument("--near", type=int, default=8)
    parser.add_argument("--datasets", default="", help="only samples of these datasets (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = {"biography": {"docs_per_sample": [3, 4, 5]}, "niah": {"n_chunks": 4, "chunk_words": 300}}
    config = TrainConfig(out="runs/kv-floor/unused.safetensors", data="biography:0.35,hotpotqa:0.35,niah:0.3",
                         data_options=options, max_chunks=6, samples=192, batch_size=8, seed=args.seed,
                         answer_cap=32, teacher_top_k=256, teacher_cache=args.teacher_cache, prefix="preamble",
                         lora_rank=8, exact_first=True, progress=False)
    trainer = Trainer(config)
    trainer.prepare()
    model = trainer.model
    adapter = PacketAdapter.load(args.adapter if args.adapter != "default" else
                                 "kvpacket_rag/adapters/smollm2-135m-instruct.safetensors", model)
    pool: dict[str, list[tuple[int, list[int]]]] = {}
    for i, sample in enumerate(trainer.samples):
        pool.setdefault(sample.id.split("/")[0], []).extend((i, list(c)) for c in sample.chunk_ids)
    extra_rng = random.Random(1)
    neighbours = nearest_passages(trainer, pool, args.near) if any(":near" in r for r in args.readings) else {}

    def mean_packet(chunks: list[list[int]], t: int, i: int, kind: str, spec: str) -> Block:
        depth, k, *source = spec.split(":")
        depth = t if depth == "m" else int(depth)
        if source == ["near"]:
            others = neighbours[tuple(chunks[t])]
        else:
            others = [c for name, items in pool.items() if (name != kind) == bool(source) for j, c in items if j != i]
        draws = [chunk_after(trainer, extra_rng.sample(others, depth), chunks[t]) for _ in range(int(k))]
        return torch.stack([d[0] for d in draws]).mean(0), torch.stack([d[1] for d in draws]).mean(0)
    rng = random.Random(0)
    rows = []
    print("| sample | packets | error: bare | adapter | mean packet | spread | KL: bare | adapter | mean packet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in range(args.n):
        sample, teacher = trainer.samples[i], trainer.teacher[i]
        chunks = [list(c) for c in sample.chunk_ids]
        if len(chunks) < 2:
            continue
        kind = sample.id.split("/")[0]
        if args.datasets and kind not in args.datasets.split(","):
            continue
        others = [c for j, c in pool[kind] if j != i]
        with torch.no_grad():
            real, bare, mean, spread = [], [], [], []
            for t in range(1, len(chunks)):
                real.append(chunk_after(trainer, chunks[:t], chunks[t]))
                bare.append(chunk_after(trainer, [], chunks[t]))
                draws = [chunk_after(trainer, rng.sample(others, t), chunks[t])
                         for _ in range(args.contexts)]
                mean.append((torch.stack([k for k, _ in draws]).mean(0), torch.stack([v for _, v in draws]).mean(0)))
                spread.append(relative_error([mean[-1]] * len(draws), draws) * len(draws) / (len(draws) - 1))
            pieces = packet_blocks(model, adapter, trainer.preamble, chunks, exact_first=True)
            n_header, pre, adapted = adapter.n_header, trainer.preamble[0].shape[2], []
            start = pieces[0][0].shape[2]
            for (k, v), ids in zip(pieces[1:], chunks[1:]):
                own = slice(n_header, n_header + len(ids))
                adapted.append((_rotate(k[:, :, own], pre - start - n_header, model), v[:, :, own]))
                start += k.shape[2]
            answer = teacher.answer_ids
            tail = list(sample.suffix_ids) + answer[:-1].tolist()

            def kl_of(blocks: list[Block]) -> float:
                place, readable = pieces[0][0].shape[2], [pieces[0]]
                for k, v in blocks:
                    readable.append((_rotate(k, place - pre, model), v))
                    place += k.shape[2]
                return float(teacher.kl(read_tail(model, readable, tail, answer.numel())).mean())

            row = {"sample": sample.id, "packets": len(chunks) - 1,
                   "error_bare": relative_error(bare, real), "error_adapter": relative_error(adapted, real),
                   "error_mean": relative_error(mean, real), "spread": sum(spread) / len(spread),
                   "kl_bare": kl_of(bare),
                   "kl_adapter": float(teacher.kl(read_tail(model, pieces, tail, answer.numel())).mean()),
                   "kl_mean": kl_of(mean), "kl_exact": kl_of(real)}
            for spec in args.readings:
                blocks = [mean_packet(chunks, t, i, kind, spec) for t in range(1, len(chunks))]
                row[f"error {spec}"], row[f"kl {spec}"] = relative_error(blocks, real), kl_of(blocks)
        rows.append(row)
        print(f"| {row['sample']} | {row['packets']} | {row['error_bare']:.4f} | {row['error_adapter']:.4f} | "
              f"{row['error_mean']:.4f} | {row['spread']:.4f} | {row['kl_bare']:.4f} | {row['kl_adapter']:.4f} | "
              f"{row['kl_mean']:.4f} |" + "".join(f" {spec}: {row[f'error {spec}']:.4f} · {row[f'kl {spec}']:.4f}"
                                                   for spec in args.readings), flush=True)
    medians = {k: float(torch.tensor([r[k] for r in rows]).median()) for k in rows[0] if k not in ("sample", "packets")}
    print("| median | | " + " | ".join(f"{medians[k]:.4f}" for k in
                                        ("error_bare", "error_adapter", "error_mean", "spread", "kl_bare", "kl_adapter",
                                         "kl_mean")) + " |"
          + "".join(f" {spec}: {medians[f'error {spec}']:.4f} · {medians[f'kl {spec}']:.4f}" for spec in args.readings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
