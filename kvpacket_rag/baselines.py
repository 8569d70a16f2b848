"""Recompute-based methods over stored packets: the CacheBlend and EPIC baselines, and kv_packet_refresh.

Both start exactly like ``no_recompute``: the bare packets (built without adapters, as these methods
reuse per-chunk caches in the field) are read from the store and rotated into place after the cached
preamble. Then a *selective forward* pushes some context tokens through the decoder layers again:

- in layer ``l`` only the tokens chosen for that layer are computed; their fresh keys/values
  overwrite the reused ones in the cache;
- each of them attends causally, over global positions, to the whole prefix as it stands in that
  layer (fresh where recomputed, reused elsewhere) — true cross-chunk attention;
- the tokens of a layer are a subset of those of the layer below, whose outputs feed them.

CacheBlend (Yao et al., EuroSys 2025) recomputes every context token in layers 0-1 (as one plain
causal prefill, the preamble included, whose K/V come out unchanged), picks the
``ratio`` share of tokens whose layer-1 keys/values deviate most from the reused ones, and recomputes
only those in the remaining layers. EPIC (Hu et al., ICML 2025) recomputes the first ``k`` tokens of
every chunk in every layer.

``kv_packet_refresh:K`` reads the packets ``kv_packet_first_exact`` reads (the first chunk's exact packet, the others'
packets for their place) and recomputes the first ``K`` tokens of every chunk after the first, as EPIC does over bare
packets: a little question-time compute over packets that already carry a context.

EPIC and kv_packet_refresh recompute the same tokens in every layer and need no probe layer to choose them, so they
leave them to the question's own forward (`PreparedContext.deferred_ids`): it runs them first, at their positions,
and the question after them, in one pass over the weights. Their keys/values in every layer are those a selective
forward before the question computes (`run_deferred`); the question reads them the same way.

Invariants (tested): ``cacheblend:1``, ``epic:K`` and ``kv_packet_refresh:K`` with K >= every chunk's length equal
``full_recompute``; ``cacheblend:0`` and ``epic:0`` equal ``no_recompute``, ``kv_packet_refresh:0``
``kv_packet_first_exact``.

Example:
    >>> engine.answer("Where was Ada born?", chunks, method="cacheblend:0.15")
    >>> engine.answer("Where was Ada born?", chunks, method="epic:32")
    >>> engine.answer("Where was Ada born?", chunks, method="kv_packet_refresh:4")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from .flops import layer_flops, rotation_flops
from .kvcache import PacketCache, assemble
from .context import ContextMethod, ContextSource, PreparedContext, first_exact_reads, synchronize
from .models import LoadedModel

BLOCK_ROWS = 256
"""Recomputed rows per masked attention call (see `_blocks`)."""

Chooser = Callable[[torch.Tensor | None], torch.Tensor]
"""Given the per-token deviation ``[n]`` at the last fully recomputed layer (None when there is none),
return the sorted context-token indices (``long``, in ``0..n-1``) to recompute in the later layers."""


@dataclass(frozen=True)
class RecomputeTrace:
    """What a selective forward computed.

    Attributes:
        positions: per decoder layer, the global positions ``[k_l]`` (long, ascending) recomputed there;
            layers after the last non-empty one are absent.
        deviation: ``[n]`` float32 key+value deviation per context token at the last fully recomputed
            layer, or None when no layer was fully recomputed.
    """

    positions: list[torch.Tensor]
    deviation: torch.Tensor | None


class _OverwriteCache(Cache):
    """A cache over an assembled `PacketCache` whose update writes fresh K/V at chosen positions.

    ``update`` returns the first ``limit`` positions (``[1, kv_heads, limit, head_dim]``: all a block
    of queries can see); before overwriting it can record each new row's squared deviation from the
    reused one.
    """

    def __init__(self, cache: PacketCache):
        super().__init__(layers=list(cache.layers))
        self.positions: torch.Tensor | None = None
        self.limit = 0
        self.record = False
        self.deviations: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        keys, values = layer.keys, layer.values
        if self.record:
            old_k, old_v = keys[:, :, self.positions], values[:, :, self.positions]
            self.deviations.append((key_states.float() - old_k.float()).square().sum(dim=(0, 1, 3))
                                   + (value_states.float() - old_v.float()).square().sum(dim=(0, 1, 3)))
        keys[:, :, self.positions] = key_states
        values[:, :, self.positions] = value_states
        return keys[:, :, : self.limit], values[:, :, : self.limit]


@dataclass(frozen=True)
class _Block:
    """Consecutive recomputed rows run together: which rows, what they see, their RoPE and mask."""

    rows: slice
    positions: torch.Tensor
    limit: int
    rotary: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None


def causal_rows_mask(query_positions: torch.Tensor, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[1, 1, len(query_positions), kv_length]``: 0 where key position <= query position."""
    keys = torch.arange(kv_length, device=query_positions.device)
    allowed = keys[None, :] <= query_positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=query_positions.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


@torch.no_grad()
def selective_recompute(model: LoadedModel, cache: PacketCache, start: int, token_ids: Sequence[int],
                        full_layers: int, choose: Chooser) -> RecomputeTrace:
    """Recompute some context tokens layer by layer inside an assembled cache, in place.

    Args:
        model: the model whose decoder layers (``model.model.model.layers``) run.
        cache: the assembled cache; positions ``start .. start+len(token_ids)-1`` hold the reused
            K/V of ``token_ids`` and nothing follows them.
        start: global position of the first token of ``token_ids``.
        token_ids: the tokens that may be recomputed, at those positions.
        full_layers: layers ``0 .. full_layers-1`` recompute every token of ``token_ids``.
        choose: picks the tokens of the later layers (see `Chooser`); called once, before layer
            ``full_layers``.

    Returns:
        The per-layer positions recomputed and the deviation `choose` saw.

    A layer that recomputes the whole cache (``start == 0``, every token) runs with the plain causal
    mask, i.e. the same kernels as an ordinary prefill; other layers get an explicit 4-D mask.
    """
    base = model.model.model
    device, n = model.device, len(token_ids)
    length = start + n
    positions = torch.arange(start, length, device=device)
    hidden = base.embed_tokens(torch.tensor([list(token_ids)], device=device))
    overwrite = _OverwriteCache(cache)
    trace, deviation, blocks = [], None, None
    for index, layer in enumerate(base.layers):
        if blocks is None or index == full_layers:
            rows = torch.arange(n, device=device)
            if index == full_layers:
                deviation = torch.cat(overwrite.deviations) if overwrite.deviations else None
                rows = choose(deviation).to(device)
                hidden = hidden[:, rows]
            if rows.numel() == 0:
                break
            query_positions = positions[rows]
            blocks = _blocks(base, hidden, query_positions, length, whole=start == 0 and rows.numel() == n)
        overwrite.record = index == full_layers - 1
        hidden = _layer_forward(layer, hidden, blocks, overwrite)
        trace.append(query_positions)
    return RecomputeTrace(trace, deviation)


@torch.no_grad()
def run_deferred(model: LoadedModel, context: PreparedContext) -> None:
    """Recompute a prepared context's deferred tokens in its cache, in place, as a selective forward over those
    tokens in every layer (what the question's own forward does first when the engine answers).

    Running it again changes nothing: the tokens read the same cache and come out the same.
    """
    if not context.deferred_ids:
        return
    base, device = model.model.model, model.device
    positions = torch.tensor(context.deferred_positions, device=device)
    hidden = base.embed_tokens(torch.tensor([context.deferred_ids], device=device))
    blocks = _blocks(base, hidden, positions, context.length, whole=False)
    overwrite = _OverwriteCache(context.cache)
    for layer in base.layers:
        hidden = _layer_forward(layer, hidden, blocks, overwrite)


def _layer_forward(layer, hidden: torch.Tensor, blocks: list["_Block"], cache: _OverwriteCache) -> torch.Tensor:
    """One decoder layer over the recomputed rows, block by block; their fresh K/V land in ``cache``."""
    outputs = []
    for block in blocks:
        cache.positions, cache.limit = block.positions, block.limit
        outputs.append(layer(hidden[:, block.rows], attention_mask=block.mask, position_ids=block.positions[None],
                             position_embeddings=block.rotary, cache=cache, use_cache=True))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _blocks(base, hidden: torch.Tensor, query_positions: torch.Tensor, length: int, whole: bool) -> list[_Block]:
    """Split ascending query positions into blocks; each block only sees keys up to its last position.

    Masked attention has no causal block skipping, so a block of rows attends to ``last + 1`` keys rather
    than the whole context: about half the attention work of one big masked block.
    """
    rotary = base.rotary_emb(hidden, query_positions[None])
    if whole:  # every position from 0: one plain causal prefill
        return [_Block(slice(None), query_positions, length, rotary, None)]
    blocks = []
    for first in range(0, query_positions.numel(), BLOCK_ROWS):
        rows = slice(first, first + BLOCK_ROWS)
        positions = query_positions[rows]
        limit = int(positions[-1]) + 1
        blocks.append(_Block(rows, positions, limit, (rotary[0][:, rows], rotary[1][:, rows]),
                             causal_rows_mask(positions, limit, hidden.dtype)))
    return blocks


class SelectiveRecompute(ContextMethod):
    """Bare packets rotated into place, then a selective forward (subclasses choose the tokens).

    `PreparedContext.forwarded_tokens` is the number of distinct tokens recomputed in at least one
    layer; ``context_flops`` counts the rotation plus every recomputed token-layer. With
    ``with_preamble`` the preamble is rerun too in the fully recomputed layers (its K/V come out
    unchanged), which makes those layers one plain causal prefill with the fastest kernels. Without
    fully recomputed layers (``full_layers == 0``) the chosen tokens are the same in every layer and are
    left to the question's forward (`PreparedContext.deferred_ids`).
    """

    full_layers = 0
    with_preamble = False

    def choose(self, deviation: torch.Tensor | None, skip: int, chunk_lengths: list[int]) -> torch.Tensor:
        """Indices (into the recomputed tokens: ``skip`` preamble tokens, then the chunks) to recompute
        after the fully recomputed layers; never below ``skip``."""
        raise NotImplementedError

    def recomputes_nothing(self) -> bool:
        return False

    packet_kinds = ("bare",)

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        fetched = self.fetch_packets(source, chunks)
        packets = fetched.packets
        loaded = time.perf_counter()
        _check_no_soft_tokens(self.name, packets)
        preamble = source.preamble_block()
        cache = assemble(buffer, [preamble, *packets], source.model.rope, reserve)
        synchronize(source.model.device)
        assembled = time.perf_counter()
        offset, lengths = preamble[0].shape[2], [p.length for p in packets]
        config = source.model.config
        flops = rotation_flops(config, sum(lengths))
        forwarded, deferred_ids, deferred_positions = 0, [], []
        if packets and not self.recomputes_nothing():
            chunk_ids = [t for p in packets for t in p.token_ids.tolist()]
            if self.full_layers == 0:  # the same tokens in every layer: the question's forward runs them first
                chosen = self.choose(None, 0, lengths).tolist()
                deferred_ids, deferred_positions = [chunk_ids[i] for i in chosen], [offset + i for i in chosen]
                flops += config.num_hidden_layers * layer_flops(config, deferred_positions)
                forwarded = len(chosen)
            else:
                first = 0 if self.with_preamble else offset
                token_ids = (source.preamble_ids() if self.with_preamble else []) + chunk_ids
                trace = selective_recompute(source.model, cache, first, token_ids, self.full_layers,
                                            lambda deviation: self.choose(deviation, offset - first, lengths))
                synchronize(source.model.device)
                flops += sum(layer_flops(config, p.tolist()) for p in trace.positions)
                forwarded = int(trace.positions[0].numel()) if trace.positions else 0
        done = time.perf_counter()
        return PreparedContext(cache, offset + sum(lengths), packet_load_s=loaded - start - fetched.build_s,
                               packet_build_s=fetched.build_s, assembly_s=assembled - loaded,
                               context_prefill_s=done - assembled if forwarded and not deferred_ids else 0.0,
                               context_flops=flops, forwarded_tokens=forwarded, packet_keys=fetched.keys,
                               packets_built=fetched.built, tokens_built=fetched.built_tokens,
                               deferred_ids=deferred_ids, deferred_positions=deferred_positions)


def _check_no_soft_tokens(name: str, packets) -> None:
    """Recomputed tokens are the packets' chunk tokens, so the packets must hold nothing else."""
    soft = next((p for p in packets if p.n_header or p.n_trailer), None)
    if soft is not None:
        raise ValueError(f"{name} recomputes chunk tokens inside packets without soft tokens, but this engine's packets "
                         f"carry {soft.n_header}+{soft.n_trailer} adapter tokens: use it with adapter 'none+preamble' "
                         "(e.g. with neighbour calibration) or a calibrated adapter of 0+0 soft tokens")


class CacheBlend(SelectiveRecompute):
    """CacheBlend: layers 0-1 in full, then the top-``ratio`` tokens by layer-1 K/V deviation.

    Args:
        ratio: share of context tokens recomputed in layers 2 and above, in [0, 1]. ``ratio == 0``
            recomputes nothing at all (no token could be selected, so the probe layers are skipped):
            it is ``no_recompute``.

    The deviation of a token is ``||k_new - k_reused||^2 + ||v_new - v_reused||^2`` summed over KV heads
    at layer 1; ``round(ratio * n)`` tokens with the largest deviation are kept (ties by position).
    """

    full_layers = 2
    with_preamble = True  # layers 0-1 then run as one plain causal prefill (the preamble comes out unchanged)

    def __init__(self, ratio: float | str = 0.15):
        try:
            self.ratio = float(ratio)
        except ValueError:
            raise ValueError(f"cacheblend takes a recompute ratio in [0, 1], e.g. 'cacheblend:0.15'; got {ratio!r}") from None
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"cacheblend ratio must be in [0, 1] (e.g. 'cacheblend:0.15'); got {self.ratio}")
        self.name = f"cacheblend:{self.ratio:g}"

    def recomputes_nothing(self) -> bool:
        return self.ratio == 0.0

    def choose(self, deviation, skip, chunk_lengths):
        assert deviation is not None
        deviation = deviation[skip:]
        count = min(deviation.numel(), round(self.ratio * deviation.numel()))
        return torch.topk(deviation, count, sorted=False).indices.sort().values + skip


class Epic(SelectiveRecompute):
    """EPIC: recompute the first ``k`` tokens of every chunk in every layer.

    Args:
        k: tokens per chunk (a non-negative integer; chunks shorter than ``k`` are recomputed whole).
    """

    family = "epic"
    first_chunk = 0  # chunks before this one are not recomputed

    def __init__(self, k: int | str = 32):
        try:
            self.k = int(k)
        except ValueError:
            raise ValueError(f"{self.family} takes a token count per chunk, e.g. '{self.family}:4'; got {k!r}") from None
        if self.k < 0:
            raise ValueError(f"{self.family} token count must be >= 0 (e.g. '{self.family}:4'); got {self.k}")
        self.name = f"{self.family}:{self.k}"

    def recomputes_nothing(self) -> bool:
        return self.k == 0

    def choose(self, deviation, skip, chunk_lengths):
        starts = (torch.tensor([0] + chunk_lengths[:-1]).cumsum(0) + skip).tolist()
        spans = [torch.arange(s, s + min(self.k, n)) for s, n in zip(starts, chunk_lengths)][self.first_chunk:]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


class PacketRefresh(Epic):
    """kv_packet_refresh: ``kv_packet_first_exact``'s packets, then the first ``k`` tokens of every later chunk
    recomputed in every layer over the assembled context.

    A chunk's first tokens are the ones its packet's context decides most (they have little of their own chunk to
    read yet). The packets must carry no soft tokens (bare or calibrated packets, e.g. by-place neighbour
    calibration); ``k = 0`` reads exactly as ``kv_packet_first_exact``.

    Args:
        k: tokens per chunk after the first (a non-negative integer; shorter chunks are recomputed whole).
    """

    family = "kv_packet_refresh"
    first_chunk = 1
    packet_kinds = ("exact", "adapted")

    def __init__(self, k: int | str = 4):
        super().__init__(k)

    def reads(self, chunks):
        """The first chunk's exact packet, then the others' packets for their place."""
        return first_exact_reads(chunks, "adapted")

