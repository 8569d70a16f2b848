"""Probe: how close packets' keys and values are to full recompute's, and whether closing the mean gap helps.

1. Per layer, the relative distance ``||packet - full|| / ||full||`` of the chunk tokens' keys and values
   (chunks 2..n, whose full-recompute cache depends on the chunks before them), for bare packets built after
   the preamble and for an adapter's packets (keys moved to full recompute's positions first).
2. Training-free calibration: bare packets plus the mean deviation ``full - bare`` (keys before RoPE, per
   layer and head), estimated on training biographies and added to chunks 2..n (or to all chunks) of
   validation questions, scaled by each ``--scales`` value; teacher-forced KL per token on the
   full-recompute answer (≤ 24 tokens).

    python benchmarks/adapter/experiments/kv_distance.py --adapter default --fit 12 --n 15 --scales 1 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "quality"))
from fidelity_vs_kl import exact_block, forced_logits, packet_block  # noqa: E402

from kvpacket_rag.adapter import resolve_adapter  # noqa: E402
from kvpacket_rag.builder import PacketBuilder  # noqa: E402
from kvpacket_rag.datasets import load_samples  # noqa: E402
from kvpacket_rag.generation import eos_ids  # noqa: E402
from kvpacket_rag.models import load_model  # noqa: E402
from kvpacket_rag.prompt import PromptFormatter  # noqa: E402
from kvpacket_rag.rope import rotate_half, rotate_keys  # noqa: E402
from kvpacket_rag.training import tokenize_sample  # noqa: E402
from kvpacket_rag.training.teacher import teacher_answer  # noqa: E402


def rotate_each(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[L, H, N, D]`` with token ``n`` rotated by ``positions[n]`` (negative: back towards 0)."""
    angles = positions.double()[:, None] * inv_freq.double()[None]
    angles = torch.cat([angles, angles], -1)
    return keys * angles.cos().float() + rotate_half(keys) * angles.sin().float()


def distances(model, formatter, preamble, preamble_block, builders, n: int) -> None:
    """Print the per-layer relative distances of part 1 on ``n`` validation biographies."""
    layers = model.config.num_hidden_layers
    sums = {name: torch.zeros(2, layers) for name in [*builders, "norm"]}
    for sample in load_samples("biography", "test", n, seed=1, docs_per_sample=5):
        t = tokenize_sample(sample, formatter, model, 0, 24)
        full = exact_block(model, t.prompt_ids(preamble)[: -len(t.suffix_ids)])
        blocks = {name: packet_block(model, b, preamble_block, t.chunk_ids) for name, b in builders.items()}
        offsets = {name: len(preamble) for name in [*builders, "full"]}
        for j, ids in enumerate(t.chunk_ids):
            f = slice(offsets["full"], offsets["full"] + len(ids))
            if j:
                sums["norm"] += torch.stack([full[i][:, :, f].pow(2).sum((1, 2, 3)) for i in range(2)])
            for name, (k, v) in blocks.items():
                soft = builders[name].adapter
                first = offsets[name] + soft.n_header
                s = slice(first, first + len(ids))
                if j:
                    moved = rotate_keys(k[:, :, s].contiguous(), offsets["full"] - first, model.rope)
                    sums[name] += torch.stack([(moved - full[0][:, :, f]).pow(2).sum((1, 2, 3)),
                                               (v[:, :, s] - full[1][:, :, f]).pow(2).sum((1, 2, 3))])
                offsets[name] += len(ids) + soft.n_header + soft.n_trailer
            offsets["full"] += len(ids)
    print("| layer | " + " | ".join(f"{name} keys | {name} values" for name in builders) + " |")
    print("|---" * (1 + 2 * len(builders)) + "|")
    for layer in range(layers):
        cells = [f"{(sums[name][i, layer] / sums['norm'][i, layer]).sqrt():.3f}" for name in builders for i in range(2)]
        print(f"| {layer} | " + " | ".join(cells) + " |")


def mean_shift(model, formatter, preamble, preamble_block, bare, fit: int, n: int, scales: list[float]) -> None:
    """Print the KL table of part 2."""
    stop, inv_freq = eos_ids(model.tokenizer, model.config), model.rope.inv_freq
    sum_k = sum_v = 0
    count = 0
    for sample in load_samples("biography", "train", fit, seed=11, docs_per_sample=5):
        t = tokenize_sample(sample, formatter, model, 0, 24)
        fk, fv = exact_block(model, t.prompt_ids(preamble)[: -len(t.suffix_ids)])
        bk, bv = packet_block(model, bare, preamble_block, t.chunk_ids)
        start = len(preamble) + len(t.chunk_ids[0])
        positions = torch.arange(start, fk.shape[2])
        sum_k = sum_k + rotate_each(fk[:, :, start:] - bk[:, :, start:], -positions, inv_freq).sum(2)
        sum_v = sum_v + (fv[:, :, start:] - bv[:, :, start:]).sum(2)
        count += len(positions)
    mean_k, mean_v = sum_k / count, sum_v / count
    print("| scale | bare | + mean shift, chunks 2..n | + mean shift, every chunk |\n|---|---|---|---|")
    for scale in scales:
        totals, tokens = [0.0, 0.0, 0.0], 0
        for sample in load_samples("biography", "test", n, seed=1, docs_per_sample=5):
            t = tokenize_sample(sample, formatter, model, 0, 24)
            reference = teacher_answer(model, t.prompt_ids(preamble), 24, stop)
            bk, bv = packet_block(model, bare, preamble_block, t.chunk_ids)
            tail = list(t.suffix_ids) + reference.answer_ids[:-1].tolist()
            for i, start in enumerate([None, len(preamble) + len(t.chunk_ids[0]), len(preamble)]):
                k, v = bk.clone(), bv.clone()
                if start is not None:
                    positions = torch.arange(start, k.shape[2])
                    shift = mean_k[:, :, None].expand(-1, -1, len(positions), -1).contiguous()
                    k[:, :, start:] += scale * rotate_each(shift, positions, inv_freq)
                    v[:, :, start:] += scale * mean_v[:, :, None]
                totals[i] += float(reference.kl(forced_logits(model, k, v, tail, reference.length)).sum())
            tokens += reference.length
        print(f"| {scale} | " + " | ".join(f"{x / tokens:.4f}" for x in totals) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--fit", type=int, default=12, help="training biographies to estimate the mean shift")
    parser.add_argument("--n", type=int, default=15, help="validation questions (test split, seed 1)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    formatter = PromptFormatter(model.tokenizer)
    preamble = formatter.preamble_ids()
    builders = {name: PacketBuilder(model, resolve_adapter(model, spec), formatter)
                for name, spec in {"bare": "none+preamble", "adapter": args.adapter}.items()}
    with torch.no_grad():
        preamble_block = exact_block(model, preamble)
        distances(model, formatter, preamble, preamble_block, builders, min(args.n, 4))
        mean_shift(model, formatter, preamble, preamble_block, builders["bare"], args.fit, args.n, args.scales)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
