"""How each method makes the documents usable at question time, and the registry of methods by name.

Every method turns ``chunks`` into a prepared cache over ``preamble | context`` (see `kvpacket_rag.context`);
the engine then prefills the same question suffix and decodes the same way, so answers, TTFT and FLOPs are
comparable across methods. `METHODS` lists every method by name; `get_method` parses ``NAME[:ARG]``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from .baselines import CacheBlend, Epic
from .context import ContextMethod, ContextSource, PacketKind, PreparedContext, synchronize
from .flops import forward_flops, rotation_flops
from .kvcache import PacketCache, assemble

if TYPE_CHECKING:
    from .adapter import PacketAdapter
    from .models import LoadedModel


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
        kind: PacketKind = adapter if adapter is not None else ("adapted" if use_adapter else "bare")
        self.packet_kinds = (kind,)
        self.name = name or ("kv_packet" if use_adapter else "no_recompute")

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        fetched = source.packets_for(chunks, self.packet_kinds[0])
        loaded = time.perf_counter()
        preamble = source.preamble_block()
        blocks = [preamble] + [(p.keys, p.values) for p in fetched.packets]
        cache = assemble(buffer, blocks, source.model.rope, reserve)
        synchronize(source.model.device)
        done = time.perf_counter()
        packet_tokens = sum(p.length for p in fetched.packets)
        return PreparedContext(cache, preamble[0].shape[2] + packet_tokens,
                               packet_load_s=loaded - start - fetched.build_s, packet_build_s=fetched.build_s,
                               assembly_s=done - loaded, context_flops=rotation_flops(source.model.config, packet_tokens),
                               packet_keys=fetched.keys, packets_built=fetched.built,
                               tokens_built=fetched.built_tokens)


class LinkMethod(PacketMethod):
    """KV packets plus link tokens: a few trained tokens per packet, run at question time.

    The packets of `kv_packet` are loaded and rotated into place, each followed by a gap of ``n_link``
    positions; one forward then runs the adapter's link tokens in every gap, each attending to everything
    before it (the preamble, earlier packets and their links, its own packet), so that they summarise their
    packet in context for the question. The model stays frozen and the packets are the same as
    `kv_packet`'s (the store is shared). Question-time cost: a forward of ``packets x n_link`` tokens.

    Args:
        adapter, name: as in `PacketMethod` (default name ``kv_link``); the adapter needs link tokens.
    """

    def __init__(self, adapter: "PacketAdapter | None" = None, name: str | None = None):
        super().__init__(True, adapter, name or "kv_link")

    def prepare(self, source: ContextSource, chunks, buffer, reserve):
        start = time.perf_counter()
        adapter = source.adapter_for(self.packet_kinds[0])
        link, n_link = adapter.link, adapter.n_link
        if n_link == 0:
            raise ValueError("kv_link runs the adapter's link tokens, but this adapter has none; train them with "
                             "`kvpacket train --n-link 8 --init-adapter ADAPTER` or use the kv_packet method")
        fetched = source.packets_for(chunks, self.packet_kinds[0])
        packets = fetched.packets
        loaded = time.perf_counter()
        preamble = source.preamble_block()
        position = preamble[0].shape[2]
        starts, slots, links = [0], list(range(position)), []
        for packet in packets:
            starts.append(position)
            slots.extend(range(position, position + packet.length))
            links.extend(range(position + packet.length, position + packet.length + n_link))
            position += packet.length + n_link
        blocks = [preamble] + [(p.keys, p.values) for p in packets]
        cache = assemble(buffer, blocks, source.model.rope, reserve + len(links), starts)
        assembled = time.perf_counter()
        if links:
            _forward_links(source.model, link, len(packets), slots, links, cache)
        synchronize(source.model.device)
        done = time.perf_counter()
        config = source.model.config
        return PreparedContext(cache, position, packet_load_s=loaded - start - fetched.build_s,
                               packet_build_s=fetched.build_s, assembly_s=assembled - loaded,
                               context_prefill_s=done - assembled,
                               context_flops=rotation_flops(config, len(slots) - starts[1])
                               + forward_flops(config, len(links), len(slots), logits_tokens=0),
                               forwarded_tokens=len(links), packet_keys=fetched.keys, packets_built=fetched.built,
                               tokens_built=fetched.built_tokens)


@torch.no_grad()
def _forward_links(model: "LoadedModel", link: torch.Tensor, n_packets: int, slots: list[int],
                   links: list[int], cache: PacketCache) -> None:
    """Append the link tokens (``link`` once per packet) at global positions ``links`` to ``cache``, whose
    slots hold positions ``slots``; each link token attends to every position not after its own."""
    embeds = link.detach().to(model.device, model.dtype).repeat(n_packets, 1)[None]
    query = torch.tensor(links, device=model.device)
    key = torch.cat([torch.tensor(slots, device=model.device), query])
    mask = torch.zeros(len(links), len(key), dtype=model.dtype, device=model.device)
    mask.masked_fill_(key[None, :] > query[:, None], torch.finfo(model.dtype).min)
    model.model.model(inputs_embeds=embeds, position_ids=query[None], attention_mask=mask[None, None],
                      cache=cache, use_cache=True)


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
    "kv_link": LinkMethod,
    "no_recompute": lambda: PacketMethod(False),
    "full_recompute": FullRecompute,
    "closed_book": ClosedBook,
    "cacheblend": CacheBlend,
    "epic": Epic,
}
"""Every method by name: a factory called with the text after ``:`` in ``NAME:ARG`` (or with nothing)."""

PARAMETERLESS = {"kv_packet", "kv_link", "no_recompute", "full_recompute", "closed_book"}


def get_method(spec: str | ContextMethod) -> ContextMethod:
    """A method object from its name (``kv_packet``, ``kv_link``, ``no_recompute``, ``full_recompute``, ``closed_book``,
    ``cacheblend:RATIO``, ``epic:K``) or the object itself.

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
