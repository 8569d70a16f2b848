"""The packet path as one ordinary forward under a block-diagonal mask.

``preamble | [H, chunk_1, T] | ... | [H, chunk_n, T] | tail`` at contiguous
positions, where the preamble and each wrapped chunk attend only to themselves
(causally) and the tail (question, answer) attends to everything before it.
This is exactly what packet assembly computes, but differentiable in the
adapter: the training student, and the oracle of the exactness tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .adapter import PacketAdapter
from .models import LoadedModel


def block_causal_mask(block_lengths: Sequence[int], tail_length: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Additive 4-D mask ``[1, 1, N, N]`` (0 allowed, -inf masked), ``N = sum(blocks) + tail``.

    Each block attends causally within itself; tail tokens attend causally to everything.
    """
    total = sum(block_lengths) + tail_length
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    start = 0
    for length in block_lengths:
        allowed[start : start + length, start : start + length] = True
        start += length
    allowed[start:, :] = True
    allowed &= torch.ones_like(allowed).tril()
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_embeddings(model: LoadedModel, adapter: PacketAdapter, preamble_ids: Sequence[int],
                      chunk_ids: Sequence[Sequence[int]], tail_ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """``[1, N, hidden]`` embeddings of preamble, wrapped chunks and tail, and the block lengths.

    Gradients flow into ``adapter`` (the embedding matrix is frozen).
    """
    embed = lambda ids: model.embed(torch.tensor(list(ids), dtype=torch.long))  # noqa: E731
    pieces = [embed(preamble_ids)] + [adapter.wrap(embed(ids)) for ids in chunk_ids] + [embed(tail_ids)]
    blocks = [p.shape[0] for p in pieces[:-1]]
    return torch.cat(pieces)[None], blocks


def block_forward(model: LoadedModel, adapter: PacketAdapter, preamble_ids: Sequence[int],
                  chunk_ids: Sequence[Sequence[int]], tail_ids: Sequence[int], logits_tokens: int | None = None) -> torch.Tensor:
    """Logits ``[len(tail) or logits_tokens, vocab]`` of the tail tokens under the block-diagonal mask.

    Args:
        logits_tokens: keep only the last this-many positions (default: the whole tail).
    """
    embeds, blocks = packed_embeddings(model, adapter, preamble_ids, chunk_ids, tail_ids)
    mask = block_causal_mask(blocks, len(tail_ids), embeds.dtype, embeds.device)
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    keep = logits_tokens if logits_tokens is not None else len(tail_ids)
    output = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    return output.logits[0]
