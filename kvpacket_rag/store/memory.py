"""MemoryCache: a least-recently-used in-process tier with a byte budget, in front of any store."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from ..errors import PacketNotFoundError
from ..packet import KVPacket
from .base import PacketStore, validate_key


class MemoryCache(PacketStore):
    """Keeps recently used packets in memory and reads/writes everything else through ``inner``.

    Args:
        inner: the store behind the cache (`LocalStore`, `RedisStore`, ...); it holds every packet.
        max_bytes: budget for the cached packets' tensor bytes (`KVPacket.nbytes`); least recently
            used packets are evicted to stay within it. A packet larger than the budget is served
            but not cached.

    Invariants: the cache never holds a packet the inner store did not return or accept; a
    ``quantization=`` argument is passed through to ``inner`` and is part of the cache key. Packets
    read in a quantized form are cached quantized (`QuantizedPacket`): the budget counts their
    quantized bytes.
    Thread-safe. Counters: ``hits``, ``misses`` (lookups the inner store answered or missed),
    ``evictions``.

    Example:
        >>> store = MemoryCache(LocalStore("packets/"), max_bytes=2 << 30)
    """

    def __init__(self, inner: PacketStore, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.inner = inner
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[str, str | None], KVPacket] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = {"hits": 0, "misses": 0, "evictions": 0}

    def __repr__(self) -> str:
        return f"MemoryCache({self.inner!r}, max_bytes={self.max_bytes})"

    @property
    def quantization(self) -> str:  # type: ignore[override]
        """The inner store's default form."""
        return self.inner.quantization

    def __len__(self) -> int:
        """Packets held in memory now."""
        return len(self._entries)

    def get(self, key: str, *, quantization: str | None = None) -> KVPacket:
        packet = self.get_many([key], quantization=quantization)[0]
        if packet is None:
            raise PacketNotFoundError(f"packet {key[:12]}… is not in the store; build it first")
        return packet

    def get_many(self, keys: Sequence[str], *, quantization: str | None = None) -> list[KVPacket | None]:
        """Cached packets from memory; the rest from ``inner.get_many`` in one call (then cached)."""
        out: list[KVPacket | None] = []
        missing: list[int] = []
        with self._lock:
            for n, key in enumerate(keys):
                packet = self._entries.get((validate_key(key), quantization))
                if packet is not None:
                    self._entries.move_to_end((key, quantization))
                    self.counters["hits"] += 1
                else:
                    missing.append(n)
                out.append(packet)
            self.counters["misses"] += len(missing)
        if missing:
            fetched = self.inner.get_many([keys[n] for n in missing], quantization=quantization)
            with self._lock:
                for n, packet in zip(missing, fetched):
                    out[n] = packet
                    if packet is not None:
                        self._admit((keys[n], quantization), packet)
        return out

    def put(self, packet: KVPacket, *, quantization: str | None = None) -> str:
        """Write through to ``inner``; cache the packet as a later `get` returns it."""
        key = self.inner.put(packet, quantization=quantization)
        with self._lock:
            cached = (key, quantization) in self._entries
        exact = (quantization or self.inner.quantization) == "none"
        if not cached and exact:
            with self._lock:
                self._admit((key, quantization), packet)  # exact form: what get would return
        return key

    def _admit(self, ident: tuple[str, str | None], packet: KVPacket) -> None:
        size = packet.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop(ident, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[ident] = packet
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.counters["evictions"] += 1

    def contains(self, key: str, *, quantization: str | None = None) -> bool:
        with self._lock:
            if (validate_key(key), quantization) in self._entries:
                return True
        return self.inner.contains(key, quantization=quantization)

    def delete(self, key: str, *, quantization: str | None = None) -> bool:
        with self._lock:
            old = self._entries.pop((validate_key(key), quantization), None)
            if old is not None:
                self._bytes -= old.nbytes
        return self.inner.delete(key, quantization=quantization) or old is not None

    def clear(self) -> None:
        """Drop every cached packet (the inner store is untouched)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def keys(self, *, quantization: str | None = None) -> Iterator[str]:
        return self.inner.keys(quantization=quantization)

    def stats(self) -> dict:
        """The inner store's stats plus ``cache``: packets, bytes, max_bytes, hits, misses, evictions, hit_rate."""
        with self._lock:
            lookups = self.counters["hits"] + self.counters["misses"]
            cache = {"packets": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                     **self.counters, "hit_rate": round(self.counters["hits"] / lookups, 4) if lookups else None}
        return {**self.inner.stats(), "cache": cache}

    def close(self) -> None:
        """Drop the cache and close the inner store."""
        self.clear()
        self.inner.close()
