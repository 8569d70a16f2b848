"""How each method makes the documents usable at question time.

Every method turns ``chunks`` into a prepared cache over ``preamble | context``;
the engine then prefills the same question suffix and decodes the same way, so
answers, TTFT and FLOPs are comparable across methods.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from transformers.cache_utils import Cache

from .flops import forward_flops, rotation_flops
from .kvcache import KVBuffer, PacketCache, assemble

if TYPE_CHECKING:
    from .adapter import PacketAdapter
    from .builder import PacketBuilder
    from .engine import PacketEngine


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


class ContextMethod(ABC):
    """One way of turning retrieved chunks into a cache. Subclasses set ``name``."""

    name: str = ""

    def packet_builders(self, engine: "PacketEngine") -> list["PacketBuilder"]:
        """The builders of the packets `prepare` reads (so that callers can build them ahead of time)."""
        return []

    @abstractmethod
    def prepare(self, engine: "PacketEngine", chunks: Sequence[str], buffer: KVBuffer, reserve: int) -> PreparedContext:
        """Build the cache for ``chunks`` in ``buffer``; keep ``reserve`` free positions for question and answer."""


class PacketMethod(ContextMethod):
    """Load stored packets, rotate them into place after the cached preamble (no model forward).

    Args:
        use_adapter: True for `kv_packet` (trained header/trailer); False for `no_recompute` (bare chunks).
        adapter: packets of this adapter instead of the engine's (to compare adapters in one run);
            requires ``name``.
        name: the method's name (default: ``kv_packet`` or ``no_recompute``).
    """

    def __init__(self, use_adapter: bool = True, adapter: "PacketAdapter | None" = None, name: str | None = None):
        if adapter is not None and not name:
            raise ValueError("a packet method with its own adapter needs a name, e.g. 'kv_packet@candidate'")
        self.use_adapter = use_adapter or adapter is not None
        self.adapter = adapter
        self.name = name or ("kv_packet" if use_adapter else "no_recompute")
        self._builders: dict[int, "PacketBuilder"] = {}

    def packet_builders(self, engine):
        if self.adapter is None:
            return [engine.builder if self.use_adapter else engine.bare_builder]
        if id(engine) not in self._builders:
            from .builder import PacketBuilder

            self._builders[id(engine)] = PacketBuilder(engine.model, self.adapter, engine.formatter)
        return [self._builders[id(engine)]]

    def prepare(self, engine, chunks, buffer, reserve):
        start = time.perf_counter()
        packets, build_s, keys = engine.packets_for(chunks, builder=self.packet_builders(engine)[0])
        loaded = time.perf_counter()
        preamble = engine.preamble_block()
        blocks = [preamble, *packets]  # packets are decoded (if quantized) and rotated into the buffer in one pass
        cache = assemble(buffer, blocks, engine.model.rope, reserve)
        _synchronize(engine.model.device)
        done = time.perf_counter()
        packet_tokens = sum(p.length for p in packets)
        return PreparedContext(cache, preamble[0].shape[2] + packet_tokens, packet_load_s=loaded - start - build_s,
                               packet_build_s=build_s, assembly_s=done - loaded,
                               context_flops=rotation_flops(engine.model.config, packet_tokens), packet_keys=keys)


class FullRecompute(ContextMethod):
    """Run the whole prompt (preamble and every chunk, no adapters) through the model."""

    name = "full_recompute"

    def prepare(self, engine, chunks, buffer, reserve):
        start = time.perf_counter()
        ids = engine.formatter.preamble_ids()
        for chunk in chunks:
            ids += engine.chunk_ids(chunk)
        engine.model.check_context(len(ids) + reserve)
        buffer.reserve(len(ids) + reserve)
        cache = PacketCache(buffer, 0)
        engine.forward_context(ids, cache)
        _synchronize(engine.model.device)
        return PreparedContext(cache, len(ids), context_prefill_s=time.perf_counter() - start,
                               context_flops=forward_flops(engine.model.config, len(ids), 0, logits_tokens=0),
                               forwarded_tokens=len(ids))


class ClosedBook(ContextMethod):
    """Ignore the documents: the question follows the cached preamble directly."""

    name = "closed_book"

    def prepare(self, engine, chunks, buffer, reserve):
        start = time.perf_counter()
        preamble = engine.preamble_block()
        cache = assemble(buffer, [preamble], engine.model.rope, reserve)
        return PreparedContext(cache, preamble[0].shape[2], assembly_s=time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


METHODS: dict[str, type[ContextMethod] | object] = {}


def get_method(spec: str | ContextMethod) -> ContextMethod:
    """A method object from its name (``kv_packet``, ``no_recompute``, ``full_recompute``, ``closed_book``,
    ``cacheblend:RATIO``, ``epic:K``) or the object itself.

    Raises:
        ValueError: unknown name or bad parameter, listing the valid names.
    """
    if isinstance(spec, ContextMethod):
        return spec
    from . import baselines  # noqa: F401  (registers cacheblend and epic in METHODS)

    name, _, arg = spec.partition(":")
    factories = {"kv_packet": lambda: PacketMethod(True), "no_recompute": lambda: PacketMethod(False),
                 "full_recompute": FullRecompute, "closed_book": ClosedBook, **METHODS}
    if name not in factories:
        raise ValueError(f"unknown method '{spec}'; choose one of {', '.join(sorted(factories))}")
    factory = factories[name]
    return factory(arg) if arg else factory()
