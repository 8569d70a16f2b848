"""The contract between the engine and the context methods.

A `ContextMethod` turns retrieved chunks into a cache over ``preamble | context``; it sees the engine only
through the narrow `ContextSource` interface (model, preamble, tokenization, packets, context forwards) and
declares in `ContextMethod.packet_kinds` which kinds of packet it reads (`ContextMethod.reads`: which packets, for
given chunks) and fetches them with `ContextMethod.fetch_packets`, so that callers can build them ahead of time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, Sequence, Union

import torch
from transformers.cache_utils import Cache

from .kvcache import KVBuffer

if TYPE_CHECKING:
    from .adapter import PacketAdapter
    from .models import LoadedModel
    from .packet import KVPacket

PacketKind = Union[Literal["adapted", "bare", "exact"], "PacketAdapter"]
"""Which packets of a chunk: ``adapted`` (the engine's adapter), ``bare`` (no adapter, built from position 0),
``exact`` (no adapter, built after the chat preamble: what full recompute computes for the context's first chunk)
or those of a given adapter."""


@dataclass
class PacketFetch:
    """Packets of some chunks, in chunk order.

    Attributes:
        packets: one packet per chunk.
        keys: their store keys.
        build_s: seconds spent building the packets that were not stored.
        built_keys: keys of the packets built (the others were read from the store).
        built_tokens: chunk tokens of the packets built.
    """

    packets: list["KVPacket"]
    keys: list[str]
    build_s: float = 0.0
    built_keys: list[str] = field(default_factory=list)
    built_tokens: int = 0

    @property
    def built(self) -> int:
        """How many packets were built."""
        return len(self.built_keys)

    def __add__(self, other: "PacketFetch") -> "PacketFetch":
        """The packets of both, ``self``'s chunks first."""
        return PacketFetch(self.packets + other.packets, self.keys + other.keys, self.build_s + other.build_s,
                           self.built_keys + other.built_keys, self.built_tokens + other.built_tokens)


class ContextSource(Protocol):
    """What a context method may use of the engine (`kvpacket_rag.engine.PacketEngine` implements it)."""

    model: "LoadedModel"

    def preamble_ids(self) -> list[int]:
        """Token ids of the cached chat preamble (system prompt and the user turn's opening)."""

    def preamble_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[layers, kv_heads, P, head_dim]`` of the preamble, computed once."""

    def chunk_ids(self, text: str) -> list[int]:
        """Token ids of one chunk as it appears in the context."""

    def packets_for(self, chunks: Sequence[str], kind: PacketKind = "adapted",
                    first_place: int | None = None) -> PacketFetch:
        """The packets of ``chunks`` of ``kind``, read from the store (missing ones are built and stored).
        ``first_place``: the place of ``chunks[0]`` in the context (chunks before it; the others follow in order),
        for packets that depend on their place; None reads the place-independent ones."""

    def packet_keys_for(self, chunks: Sequence[str], kind: PacketKind = "adapted",
                        first_place: int | None = None) -> list[str]:
        """The store keys `packets_for` reads for the same arguments (nothing is read or built)."""

    def forward_context(self, ids: Sequence[int], cache: Cache) -> None:
        """Run context tokens through the model (no LM head), appending to ``cache``."""


@dataclass
class PreparedContext:
    """A cache holding ``preamble | context`` ready for the question.

    Attributes:
        cache: transformers cache of ``length`` positions (extended in place by the question).
        length: positions used; the question starts at this position id.
        packet_load_s: time reading packets from the store (0 for recompute-only methods).
        packet_build_s: time building packets missing from the store (0 when all were stored).
        assembly_s: time rotating and concatenating packets.
        context_prefill_s: time of forwards over context tokens (0 for kv_packet).
        context_flops: FLOPs spent on the context at question time (rotation, recomputed tokens).
        forwarded_tokens: context tokens pushed through the model at question time.
        packet_keys: keys of the packets used, in context order.
        packets_built: how many of them were built during this call (the rest came from the store).
        tokens_built: chunk tokens of the packets built during this call.
        deferred_ids: context tokens whose cached keys/values are provisional: the next forward over the cache must
            first recompute them, in every layer, at ``deferred_positions`` (ascending, below ``length``), each
            attending to the cache up to its own position. The engine runs them in the question's own forward;
            `kvpacket_rag.baselines.run_deferred` runs them alone.
        deferred_positions: their positions.
    """

    cache: Cache
    length: int
    packet_load_s: float = 0.0
    packet_build_s: float = 0.0
    assembly_s: float = 0.0
    context_prefill_s: float = 0.0
    context_flops: int = 0
    forwarded_tokens: int = 0
    packet_keys: list[str] = field(default_factory=list)
    packets_built: int = 0
    tokens_built: int = 0
    deferred_ids: list[int] = field(default_factory=list)
    deferred_positions: list[int] = field(default_factory=list)


class ContextMethod(ABC):
    """One way of turning retrieved chunks into a cache.

    Subclasses set ``name`` and ``packet_kinds`` (the packets `prepare` reads; empty for methods that read none).
    """

    name: str = ""
    packet_kinds: tuple[PacketKind, ...] = ()

    def reads(self, chunks: Sequence[str]) -> list[tuple[list[str], PacketKind, int | None]]:
        """The packets `prepare` reads for ``chunks``: ``(chunks, kind, first_place)`` groups in the order read, each
        ``source.packets_for(chunks, kind, first_place)``. By default every chunk's packet of each of
        ``packet_kinds``, place-independent."""
        return [(list(chunks), kind, None) for kind in self.packet_kinds]

    def fetch_packets(self, source: ContextSource, chunks: Sequence[str]) -> PacketFetch:
        """The stored packets `prepare` reads for ``chunks`` (`reads`), in the order read (missing ones are built and
        stored): what a caller builds ahead of time to keep building out of the timed answer."""
        fetched = PacketFetch([], [])
        for group, kind, place in self.reads(chunks):
            fetched += source.packets_for(group, kind, first_place=place)
        return fetched

    @abstractmethod
    def prepare(self, source: ContextSource, chunks: Sequence[str], buffer: KVBuffer, reserve: int) -> PreparedContext:
        """Build the cache for ``chunks`` in ``buffer``; keep ``reserve`` free positions for question and answer."""


def first_exact_reads(chunks: Sequence[str], kind: PacketKind) -> list[tuple[list[str], PacketKind, int]]:
    """The packet groups of a reading with the first chunk exact: ``chunks[0]``'s exact packet, then the other chunks'
    packets of ``kind`` for their place (see `ContextMethod.reads`)."""
    chunks = list(chunks)
    if not chunks:
        return [(chunks, kind, 0)]
    return [(chunks[:1], "exact", 0), (chunks[1:], kind, 1)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
