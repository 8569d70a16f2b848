"""How each method makes the documents usable at question time, and the registry of methods by name.

Every method turns ``chunks`` into a prepared cache over ``preamble | context`` (see `kvpacket_rag.context`);
the engine then prefills the same question suffix and decodes the same way, so answers, TTFT and FLOPs are
comparable across methods. `METHODS` lists every method by name; `get_method` parses ``NAME[:ARG]``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .baselines import CacheBlend, Epic, PacketRefresh
from .context import ContextMethod, ContextSource, PacketKind, PreparedContext, first_exact_reads, synchronize
from .flops import forward_flops, rotation_flops
from .kvcache import PacketCache, assemble

if TYPE_CHECKING:
    from .adapter import PacketAdapter


class PacketMethod(ContextMethod):
    """Load stored packets, rotate them into place after the cached preamble (no model forward).

    Args:
        use_adapter: True for `kv_packet` (trained header/trailer); False for `no_recompute` (bare chunks).
        adapter: packets of this adapter instead of the engine's (to compare adapters in one run);
            requires ``name``.
        name: the method's name (default: ``kv_packet``, ``kv_packet_first_exact`` or ``no_recompute``).
        exact_first: read the first chunk from its ``exact`` packet (built plain after the chat preamble, the keys
            and values full recompute computes for it) and the others from their packets: still no model forward,
            one more stored packet per chunk.
    """

    def __init__(self, use_adapter: bool = True, adapter: "PacketAdapter | None" = None, name: str | None = None,
                 exact_first: bool = False):
        if adapter is not None and not name:
            raise ValueError("a packet method with its own adapter needs a name, e.g. 'kv_packet@candidate'")
        kind: PacketKind = adapter if adapter is not None else ("adapted" if use_adapter else "bare")
        self.exact_first = exact_first
        self.packet_kinds = ("exact", kind) if exact_first else (kind,)
        default = ("kv_packet_first_exact" if exact_first else "kv_packet") if use_adapter else "no_recompute"
        self.name = name or default

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        fetched = self.fetch_packets(source, chunks)
        loaded = time.perf_counter()
        preamble = source.preamble_block()
        blocks = [preamble, *fetched.packets]  # packets are decoded (if quantized) and rotated into the buffer in one pass
        cache = assemble(buffer, blocks, source.model.rope, reserve)
        synchronize(source.model.device)
        done = time.perf_counter()
        packet_tokens = sum(p.length for p in fetched.packets)
        return PreparedContext(cache, preamble[0].shape[2] + packet_tokens,
                               packet_load_s=loaded - start - fetched.build_s, packet_build_s=fetched.build_s,
                               assembly_s=done - loaded, context_flops=rotation_flops(source.model.config, packet_tokens),
                               packet_keys=fetched.keys, packets_built=fetched.built,
                               tokens_built=fetched.built_tokens)

    def reads(self, chunks) -> list[tuple[list[str], PacketKind, int | None]]:
        """Every chunk's packet for its place (the first chunk's exact packet with ``exact_first``)."""
        if self.exact_first:
            return first_exact_reads(chunks, self.packet_kinds[-1])
        return [(list(chunks), self.packet_kinds[-1], 0)]


class FullRecompute(ContextMethod):
    """Run the whole prompt (preamble and every chunk, no adapters) through the model."""

    name = "full_recompute"

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        ids = source.preamble_ids()
        for chunk in chunks:
            ids += source.chunk_ids(chunk)
        source.model.check_context(len(ids) + reserve)
        buffer.reserve(len(ids) + reserve)
        cache = PacketCache(buffer, 0)
        source.forward_context(ids, cache)
        synchronize(source.model.device)
        return PreparedContext(cache, len(ids), context_prefill_s=time.perf_counter() - start,
                               context_flops=forward_flops(source.model.config, len(ids), 0, logits_tokens=0),
                               forwarded_tokens=len(ids))


class ClosedBook(ContextMethod):
    """Ignore the documents: the question follows the cached preamble directly."""

    name = "closed_book"

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        preamble = source.preamble_block()
        cache = assemble(buffer, [preamble], source.model.rope, reserve)
        return PreparedContext(cache, preamble[0].shape[2], assembly_s=time.perf_counter() - start)


METHODS: dict[str, Callable[..., ContextMethod]] = {
    "kv_packet": lambda: PacketMethod(True),
    "kv_packet_first_exact": lambda: PacketMethod(True, exact_first=True),
    "no_recompute": lambda: PacketMethod(False),
    "full_recompute": FullRecompute,
    "closed_book": ClosedBook,
    "cacheblend": CacheBlend,
    "epic": Epic,
    "kv_packet_refresh": PacketRefresh,
}
"""Every method by name: a factory called with the text after ``:`` in ``NAME:ARG`` (or with nothing)."""

DEFAULT_METHOD = "kv_packet_first_exact"
"""How answers read the chunks unless told otherwise: no model forward over them, the first retrieved chunk exact."""

PARAMETERLESS = {"kv_packet", "kv_packet_first_exact", "no_recompute", "full_recompute", "closed_book"}


def get_method(spec: str | ContextMethod) -> ContextMethod:
    """A method object from its name (``kv_packet``, ``kv_packet_first_exact``, ``no_recompute``,
    ``full_recompute``, ``closed_book``, ``cacheblend:RATIO``, ``epic:K``, ``kv_packet_refresh:K``) or the object
    itself.

    Raises:
        ValueError: unknown name or bad parameter, listing the valid names.
    """
    if isinstance(spec, ContextMethod):
        return spec
    name, _, arg = spec.partition(":")
    if name not in METHODS:
        raise ValueError(f"unknown method '{spec}'; choose one of {', '.join(sorted(METHODS))}")
    if arg and name in PARAMETERLESS:
        raise ValueError(f"method '{name}' takes no parameter; pass '{name}'")
    return METHODS[name](arg) if arg else METHODS[name]()
