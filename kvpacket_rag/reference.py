"""The packet path as one ordinary forward under a block mask.

``preamble | [H, chunk_1, T] | ... | [H, chunk_n, T] | tail`` at contiguous
positions, where the preamble and each wrapped chunk attend only to themselves
(causally) and the tail (question, answer) attends to everything before it.
This is exactly what packet assembly computes, but differentiable in the
adapter: the oracle of the exactness tests, and the training student under
gradient checkpointing (`kvpacket_rag.training.student`).

When the adapter's packets are conditioned on the preamble (``prefix ==
"preamble"``), every packet was built after its own copy of the preamble. The
one forward then holds such a copy before each wrapped chunk, at the positions
just before the chunk's global start, visible to that chunk only: the relative
positions inside each block are those the packet was built with, and the tail
sees the real preamble and every wrapped chunk, never the copies. An adapter with
one calibration context copies ``preamble | context`` instead (with several, the
packet is their mean, which no single forward computes).

An adapter's build-time LoRA applies to the wrapped chunks' tokens only (the gate of `packed_layout`).

With ``exact_first`` the first chunk is read as full recompute reads it: plain, right after the preamble, in the
preamble's block (the `kv_packet_first_exact` method); the other chunks follow as packets.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .adapter import PREFIX_PREAMBLE, PacketAdapter
from .models import LoadedModel


def block_causal_mask(block_lengths: Sequence[int], tail_length: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", hidden: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Additive 4-D mask ``[1, 1, N, N]`` (0 allowed, -inf masked), ``N = sum(blocks) + tail``.

    Each block attends causally within itself; tail tokens attend causally to everything except the
    ``(start, end)`` position spans listed in ``hidden``.
    """
    total = sum(block_lengths) + tail_length
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    start = 0
    for length in block_lengths:
        allowed[start : start + length, start : start + length] = True
        start += length
    allowed[start:, :] = True
    for first, end in hidden:
        allowed[start:, first:end] = False
    allowed &= torch.ones_like(allowed).tril()
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_layout(model: LoadedModel, adapter: PacketAdapter, preamble_ids: Sequence[int],
                  chunk_ids: Sequence[Sequence[int]], tail_ids: Sequence[int], exact_first: bool = False):
    """Embeddings ``[1, N, hidden]``, position ids ``[1, N]``, mask ``[1, 1, N, N]`` and build gate ``[1, N, 1]``
    (1.0 on wrapped-chunk tokens, 0.0 on the preamble, its copies and the tail) of the packet path.

    Gradients flow into ``adapter`` (the embedding matrix is frozen).
    """
    if len(adapter.calibration) > 1:
        raise ValueError("packets averaged over several calibration contexts are no single forward; "
                         "compare the adapter of each context alone")
    embed = lambda ids: model.embed(torch.tensor(list(ids), dtype=torch.long))  # noqa: E731
    preamble = embed(preamble_ids)
    built_after = torch.cat([preamble, embed(adapter.calibration[0])]) if adapter.calibration else preamble
    n_pre = built_after.shape[0]
    conditioned = adapter.prefix == PREFIX_PREAMBLE
    if exact_first and chunk_ids:  # the first chunk joins the preamble's block, plain
        head, chunk_ids = torch.cat([preamble, embed(chunk_ids[0])]), chunk_ids[1:]
    else:
        head = preamble
    n_head = head.shape[0]
    pieces, positions, blocks, hidden, gate = [head], [torch.arange(n_head)], [n_head], [], [torch.zeros(n_head)]
    start, offset = n_head, n_head  # global position of the next wrapped chunk; its offset in the sequence
    for ids in chunk_ids:
        block = adapter.wrap(embed(ids))
        length = block.shape[0]
        if conditioned:  # the copy of what the packet was built after: seen by this block only
            pieces.append(built_after)
            positions.append(torch.arange(start - n_pre, start))
            hidden.append((offset, offset + n_pre))
            gate.append(torch.zeros(n_pre))
        pieces.append(block)
        gate.append(torch.ones(length))
        positions.append(torch.arange(start, start + length))
        blocks.append(length + n_pre * conditioned)
        start += length
        offset += blocks[-1]
    pieces.append(embed(tail_ids))
    positions.append(torch.arange(start, start + len(tail_ids)))
    gate.append(torch.zeros(len(tail_ids)))
    embeds = torch.cat(pieces)[None]
    mask = block_causal_mask(blocks, len(tail_ids), embeds.dtype, embeds.device, hidden)
    return embeds, torch.cat(positions)[None].to(embeds.device), mask, torch.cat(gate)[None, :, None].to(embeds.device)


def block_forward(model: LoadedModel, adapter: PacketAdapter, preamble_ids: Sequence[int],
                  chunk_ids: Sequence[Sequence[int]], tail_ids: Sequence[int], logits_tokens: int | None = None,
                  exact_first: bool = False) -> torch.Tensor:
    """Logits ``[len(tail) or logits_tokens, vocab]`` of the tail tokens under the packet path's block mask.

    Args:
        logits_tokens: keep only the last this-many positions (default: the whole tail).
        exact_first: read the first chunk plain after the preamble, as full recompute does.
    """
    embeds, positions, mask, gate = packed_layout(model, adapter, preamble_ids, chunk_ids, tail_ids, exact_first)
    keep = logits_tokens if logits_tokens is not None else len(tail_ids)
    with adapter.building(model, gate):
        output = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    return output.logits[0]
