"""The training student: the packet path itself, differentiable in the adapter.

Each wrapped chunk is run on its own (after the preamble's cached keys and values when packets are built after
the preamble), its keys are rotated to the chunk's place in the context, and the question and answer are read
over the assembled cache: the engine's build → rotate → assemble → prefill, with gradients. It computes the same
logits as one forward under the block mask (`kvpacket_rag.reference.block_forward`), without that forward's
``N × N`` mask and without running a copy of the preamble per chunk, so it costs less per sample.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from kvpacket_rag.adapter import PREFIX_PREAMBLE, PacketAdapter
from kvpacket_rag.models import LoadedModel
from kvpacket_rag.reference import block_forward
from kvpacket_rag.rope import delta_cos_sin, rotate_half

from .data import TokenizedSample

Block = tuple[torch.Tensor, torch.Tensor]
"""Keys and values ``[layers, kv_heads, tokens, head_dim]``."""


@torch.no_grad()
def preamble_block(model: LoadedModel, preamble_ids: Sequence[int]) -> Block:
    """The preamble's keys and values at positions ``0..P-1`` (no gradient: the adapter does not change them)."""
    cache = DynamicCache()
    model.model.model(input_ids=torch.tensor([list(preamble_ids)], device=model.device), cache=cache, use_cache=True)
    return _stack(cache)


def packet_blocks(model: LoadedModel, adapter: PacketAdapter, preamble: Block, chunk_ids: Sequence[Sequence[int]],
                  exact_first: bool = False) -> list[Block]:
    """The assembled context as pieces: ``[preamble, chunk_1, ..., chunk_n]`` keys/values at their global positions.

    Each wrapped chunk is built on its own (after the preamble when ``adapter.prefix`` is ``"preamble"``) and its
    keys rotated to its place. With ``exact_first`` the first chunk is run plain after the preamble (no gradient).
    """
    keys, values = preamble
    n_pre = keys.shape[2]
    first = n_pre if adapter.prefix == PREFIX_PREAMBLE else 0
    pieces, start = [preamble], n_pre
    if exact_first and chunk_ids:
        head_k, head_v = _plain_after(model, preamble, chunk_ids[0])
        pieces, start, chunk_ids = [(head_k, head_v)], head_k.shape[2], chunk_ids[1:]
    for ids in chunk_ids:
        block = adapter.wrap(model.embed(torch.tensor(list(ids), dtype=torch.long, device=model.device)))
        cache = _cache(keys, values) if first else DynamicCache()
        positions = torch.arange(first, first + block.shape[0], device=model.device)[None]
        with adapter.building(model):
            model.model.model(inputs_embeds=block[None], position_ids=positions, cache=cache, use_cache=True)
        block_k, block_v = _stack(cache)
        pieces.append((_rotate(block_k[:, :, first:], start - first, model), block_v[:, :, first:]))
        start += block.shape[0]
    return pieces


def read_tail(model: LoadedModel, pieces: Sequence[Block], tail_ids: Sequence[int], logits_tokens: int) -> torch.Tensor:
    """Logits ``[logits_tokens, vocab]`` of the last ``tail_ids`` positions, read over the concatenated ``pieces``."""
    start = sum(keys.shape[2] for keys, _ in pieces)
    context = _cache(torch.cat([k for k, _ in pieces], 2), torch.cat([v for _, v in pieces], 2))
    positions = torch.arange(start, start + len(tail_ids), device=model.device)[None]
    out = model.model(input_ids=torch.tensor([list(tail_ids)], device=model.device), position_ids=positions,
                      cache=context, use_cache=True, logits_to_keep=logits_tokens)
    return out.logits[0]


def packet_forward(model: LoadedModel, adapter: PacketAdapter, preamble: Block, chunk_ids: Sequence[Sequence[int]],
                   tail_ids: Sequence[int], logits_tokens: int, exact_first: bool = False) -> torch.Tensor:
    """Logits ``[logits_tokens, vocab]`` of the last tail positions over the assembled packets.

    Args:
        preamble: `preamble_block` of the chat preamble the tail follows (and every packet is built after, when
            ``adapter.prefix`` is ``"preamble"``).
        chunk_ids: token ids of each chunk, in context order.
        tail_ids: question suffix and teacher-forced answer tokens.
        exact_first: read the first chunk plain after the preamble (no gradient), the others as packets.

    Equals `kvpacket_rag.reference.block_forward` to float rounding; gradients flow into the adapter's soft
    tokens and build-time low-rank updates only.
    """
    return read_tail(model, packet_blocks(model, adapter, preamble, chunk_ids, exact_first), tail_ids, logits_tokens)


def student_logits(model: LoadedModel, adapter: PacketAdapter, preamble_ids: list[int], sample: TokenizedSample,
                   answer_ids: torch.Tensor, preamble: Block | None = None, exact_first: bool = False) -> torch.Tensor:
    """Student logits ``[A, vocab]`` predicting each of the ``A`` answer tokens (differentiable in ``adapter``).

    The tail is ``question suffix | answer[:-1]``; its last ``A`` positions predict ``answer[0..A-1]``.

    Args:
        preamble: `preamble_block` of ``preamble_ids``, computed once and shared by the samples (None: computed here).
        exact_first: see `packet_forward`.

    Under gradient checkpointing transformers drops the KV cache this path reads; use `block_student_logits` there.
    """
    tail = list(sample.suffix_ids) + answer_ids[:-1].tolist()
    preamble = preamble if preamble is not None else preamble_block(model, preamble_ids)
    return packet_forward(model, adapter, preamble, sample.chunk_ids, tail, answer_ids.numel(), exact_first)


def block_student_logits(model: LoadedModel, adapter: PacketAdapter, preamble_ids: list[int],
                         sample: TokenizedSample, answer_ids: torch.Tensor, exact_first: bool = False) -> torch.Tensor:
    """`student_logits` as one forward under the block mask: slower, but it needs no KV cache, so it also works
    with gradient checkpointing (which drops the cache inside transformers)."""
    tail = list(sample.suffix_ids) + answer_ids[:-1].tolist()
    return block_forward(model, adapter, preamble_ids, [list(c) for c in sample.chunk_ids], tail,
                         logits_tokens=answer_ids.numel(), exact_first=exact_first)


@torch.no_grad()
def _plain_after(model: LoadedModel, preamble: Block, ids: Sequence[int]) -> Block:
    """Keys and values of ``preamble | ids``, the chunk run plain after the preamble (full recompute's own)."""
    cache = _cache(*preamble)
    start = preamble[0].shape[2]
    positions = torch.arange(start, start + len(ids), device=model.device)[None]
    model.model.model(input_ids=torch.tensor([list(ids)], device=model.device), position_ids=positions, cache=cache,
                      use_cache=True)
    return _stack(cache)


def _stack(cache: DynamicCache) -> Block:
    return torch.stack([layer.keys[0] for layer in cache.layers]), torch.stack([layer.values[0] for layer in cache.layers])


def _cache(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer][None], values[layer][None], layer)
    return cache


def _rotate(keys: torch.Tensor, delta: int, model: LoadedModel) -> torch.Tensor:
    """Post-RoPE keys moved ``delta`` positions later (differentiable, unlike `kvpacket_rag.rope.rotate_keys`)."""
    if delta == 0:
        return keys
    cos, sin = delta_cos_sin(model.rope, delta, keys.device, keys.dtype)
    return keys * cos + rotate_half(keys) * sin


def kv_match_error(model: LoadedModel, pieces: Sequence[Block], chunk_ids: Sequence[Sequence[int]], n_header: int,
                   exact_first: bool = False) -> torch.Tensor:
    """Relative squared error of the packets' chunk keys/values against full recompute's (a scalar, differentiable).

    ``pieces`` is `packet_blocks` of ``chunk_ids``: ``pieces[0]`` holds the preamble (and, with ``exact_first``, the
    first chunk read plainly after it, full recompute's own, so not compared), then one packet per chunk. The
    reference is the plain forward of the packets' chunks after ``pieces[0]`` (no gradient): each chunk's keys and
    values as computed in context, its keys rotated to the chunk's place in ``pieces`` (the header tokens shift it).
    Per layer, the summed squared error of keys and of values over every packet's chunk tokens is divided by the
    reference's summed squares; the result is the mean over layers of keys and values (0 when there is no packet).
    """
    packed = chunk_ids[1:] if exact_first else chunk_ids
    if not packed:
        return torch.zeros((), device=model.device)
    ref_k, ref_v = _plain_after(model, pieces[0], [t for chunk in packed for t in chunk])
    start = plain = pieces[0][0].shape[2]  # where the first packet, and its chunk in plain text, begin
    error_k = error_v = norm_k = norm_v = 0.0
    for (keys, values), ids in zip(pieces[1:], packed):
        n = len(ids)
        got_k, got_v = keys[:, :, n_header:n_header + n], values[:, :, n_header:n_header + n]
        want_k = _rotate(ref_k[:, :, plain:plain + n], start + n_header - plain, model)
        want_v = ref_v[:, :, plain:plain + n]
        error_k = error_k + (got_k - want_k).pow(2).sum((1, 2, 3))
        error_v = error_v + (got_v - want_v).pow(2).sum((1, 2, 3))
        norm_k = norm_k + want_k.pow(2).sum((1, 2, 3))
        norm_v = norm_v + want_v.pow(2).sum((1, 2, 3))
        start, plain = start + keys.shape[2], plain + n
    return ((error_k / norm_k).mean() + (error_v / norm_v).mean()) / 2
