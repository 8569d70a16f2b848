"""Probe: a few context tokens recomputed at question time over the packets kv_packet reads.

Runs `kvpacket eval` (same arguments) with three more methods, each reading every chunk from its packet for its place
(as `kv_packet` does under by-place calibration; the first chunk's is its exact packet) and then pushing some of the
context's tokens through every layer again with attention over the whole assembled context (the selective forward of
the EPIC/CacheBlend baselines):

- ``placed_first:K``: the first K tokens of every chunk after the first (EPIC's choice, over placed packets);
- ``placed_last:K``: the last K tokens of every chunk after the first (the tokens a chunk ends on, next to its successor);
- ``placed_tail:K``: the last K tokens of the whole context (those right before the question);
- ``placed_spread:K``: the K tokens of every chunk after the first whose stored keys and values the context moved most
  (the squared difference between the chunk's placed packet and its exact packet, built after nothing, summed over
  layers, each layer's scaled by its mean; layers that do not move, such as the first, left out): a choice known at ingestion, without CacheBlend's two-layer pass;
- ``placed_mix:K``: the first K/2 tokens of every chunk after the first, then the K/2 of its others the context moved
  most (as ``placed_spread``);
- ``placed_query:K``: the K tokens of every chunk after the first that the question attends to most over the placed
  packets (attention of every question token, summed over heads and layers), found by one extra forward of the
  question before the tokens are recomputed (its cost is not in the TTFT this probe reports);
- ``placed_qfirst:K``: the first K/2 tokens, then the K/2 others the question attends to most.

    python benchmarks/adapter/experiments/placed_recompute_eval.py --dataset biography \
        --methods kv_packet,placed_first:8,placed_last:8,placed_tail:32 --n 30 --split test --seed 1 \
        --max-new-tokens 24 --calibrate-neighbours 1000 --calibration-contexts 4 --calibration-depth 4 \
        --calibrate-by-place --adapter none+preamble --device cpu --threads 2 --json OUT.json
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface

from kvpacket_rag import attention
from kvpacket_rag.baselines import Epic
from kvpacket_rag.cli import main
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.kvcache import PacketCache
from kvpacket_rag.methods import METHODS

QUESTION: dict[str, str] = {}  # the question being answered (set by the wrapped PacketEngine.answer)


class PlacedRecompute(Epic):
    """Placed packets (kv_packet's reading), then K tokens per chunk (or of the context's tail) recomputed."""

    packet_kinds = ("adapted",)
    where = "first"

    def __init__(self, k: int | str):
        super().__init__(k)
        self.name = f"placed_{self.where}:{self.k}"

    def reads(self, chunks):
        return [(list(chunks), "adapted", 0)]

    def prepare(self, source, chunks, buffer, reserve):
        self._source, self._buffer = source, buffer
        return super().prepare(source, chunks, buffer, reserve)

    def fetch_packets(self, source, chunks):
        fetched = super().fetch_packets(source, chunks)
        if self.where in ("spread", "mix"):
            exact = source.packets_for(chunks, "exact").packets
            self.spread = [_moved(placed, alone) for placed, alone in zip(fetched.packets, exact)]
        return fetched

    def choose(self, deviation, skip, chunk_lengths):
        starts = (torch.tensor([0] + chunk_lengths[:-1]).cumsum(0) + skip).tolist()
        if self.where == "tail":
            total = skip + sum(chunk_lengths)
            first_later = starts[1] if len(starts) > 1 else total
            return torch.arange(max(first_later, total - self.k), total)
        spans = []
        if self.where in ("query", "qfirst"):
            offset = len(self._source.preamble_ids())  # the preamble before the chunks (choose's indices skip it)
            mass = _question_attention(self._source, self._buffer, offset + sum(chunk_lengths))[offset:]
        for index, (start, length) in list(enumerate(zip(starts, chunk_lengths)))[1:]:
            k = min(self.k, length)
            if self.where == "query":
                spans.append(torch.topk(mass[start:start + length], k).indices.sort().values + start)
                continue
            if self.where == "qfirst":
                first = k // 2
                rest = torch.topk(mass[start + first:start + length], k - first).indices + first
                spans.append(torch.cat([torch.arange(first), rest.sort().values]) + start)
                continue
            if self.where == "spread":
                spans.append(torch.topk(self.spread[index], k).indices.sort().values + start)
                continue
            if self.where == "mix":  # the first k // 2, then the rest of k the context moved most
                first = k // 2
                rest = torch.topk(self.spread[index][first:length], k - first).indices + first
                spans.append(torch.cat([torch.arange(first), rest.sort().values]) + start)
                continue
            spans.append(torch.arange(start, start + k) if self.where == "first" else
                         torch.arange(start + length - k, start + length))
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


def _moved(placed, alone) -> torch.Tensor:
    """Per packet position ``[T]``: how far the placed packet's keys and values are from the exact packet's."""
    diff = ((placed.keys.float() - alone.keys.float()) ** 2 + (placed.values.float() - alone.values.float()) ** 2)
    per_layer = diff.sum(dim=(1, 3))  # [layers, T]
    mean = per_layer.mean(dim=1, keepdim=True)
    weight = torch.where(mean > 1e-6 * mean.max(), 1 / mean.clamp_min(1e-30), 0.0)  # layer 0 moves by rounding only
    return (per_layer * weight).sum(dim=0)


def _question_attention(source, buffer, length: int) -> torch.Tensor:
    """``[length]``: attention mass the question's tokens give each cached position over the assembled cache (one
    forward of the question at its positions; the positions it writes after ``length`` are overwritten later)."""
    model = source.model
    suffix = source.formatter.suffix_ids(QUESTION["text"])
    mass = torch.zeros(length)

    def recording(module, query, key, value, attention_mask, **kwargs):
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = (query @ keys.transpose(-1, -2)).float() * kwargs.get("scaling", query.shape[-1] ** -0.5)
        q = query.shape[2]
        causal = torch.ones(q, q, dtype=torch.bool).triu(1)
        scores[..., length:length + q] = scores[..., length:length + q].masked_fill(causal, float("-inf"))
        mass.add_(scores[..., :length + q].softmax(-1)[..., :length].sum(dim=(0, 1, 2)))
        return attention.packed_gqa_sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(attention.NAME, recording)
    try:
        with torch.no_grad():
            positions = torch.arange(length, length + len(suffix))[None]
            model.model.model(input_ids=torch.tensor([suffix]), position_ids=positions, cache=PacketCache(buffer, length),
                              use_cache=True)
    finally:
        AttentionInterface.register(attention.NAME, attention.packed_gqa_sdpa)
    return mass


def _remember_question(answer):
    def wrapped(self, question, *args, **kwargs):
        QUESTION["text"] = question
        return answer(self, question, *args, **kwargs)
    return wrapped


def variant(where: str):
    return type(f"Placed{where.title()}", (PlacedRecompute,), {"where": where})


if __name__ == "__main__":
    PacketEngine.answer = _remember_question(PacketEngine.answer)
    for where in ("first", "last", "tail", "spread", "mix", "query", "qfirst"):
        METHODS[f"placed_{where}"] = variant(where)
    sys.exit(main(["eval", *sys.argv[1:]]))
