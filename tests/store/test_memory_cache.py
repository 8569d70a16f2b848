"""MemoryCache: LRU order, byte budget, counters, write-through, quantized forms."""

from __future__ import annotations

import pytest

from kvpacket_rag.errors import PacketNotFoundError
from kvpacket_rag.store import InMemoryStore, LocalStore, MemoryCache, open_store


def test_lru_with_byte_budget_counts_hits_misses_evictions(tmp_path, packets):
    inner = LocalStore(tmp_path / "s")
    keys = [inner.put(p) for p in packets]
    size = packets[0].nbytes
    assert all(p.nbytes == size for p in packets)
    cache = MemoryCache(inner, max_bytes=2 * size)
    cache.get_many(keys[:2])  # miss, miss -> cached: 0, 1
    cache.get(keys[0])  # hit; LRU order now 1, 0
    cache.get(keys[2])  # miss -> evicts 1
    assert cache.counters == {"hits": 1, "misses": 3, "evictions": 1} and len(cache) == 2
    inner_reads = inner.counters["hits"]
    got = cache.get_many([keys[0], keys[2], keys[1]])  # hit, hit, miss (1 evicts 0)
    assert [g.key for g in got] == [keys[0], keys[2], keys[1]]
    assert inner.counters["hits"] == inner_reads + 1 and cache.counters["evictions"] == 2
    stats = cache.stats()
    assert stats["packets"] == 4 and stats["cache"]["bytes"] == 2 * size <= stats["cache"]["max_bytes"]
    assert stats["cache"]["hit_rate"] == pytest.approx(3 / 7, abs=1e-4)


def test_write_through_delete_and_oversized_packets(packets):
    inner = InMemoryStore()
    cache = MemoryCache(inner, max_bytes=packets[0].nbytes)
    key = cache.put(packets[0])
    assert inner.contains(key) and len(cache) == 1 and cache.get(key) is packets[0]
    assert cache.delete(key) and not cache.contains(key) and len(cache) == 0
    with pytest.raises(PacketNotFoundError):
        cache.get(key)
    tiny = MemoryCache(InMemoryStore(), max_bytes=10)
    tiny.put(packets[1])
    assert len(tiny) == 0 and tiny.get(packets[1].key).key == packets[1].key  # served, never cached
    with pytest.raises(ValueError):
        MemoryCache(inner, max_bytes=-1)


def test_quantized_store_is_cached_as_read_back(tmp_path, packets):
    cache = open_store(str(tmp_path / "s"), quantization="int8", cache_bytes=1 << 30)
    assert isinstance(cache, MemoryCache)
    key = cache.put(packets[0])
    assert len(cache) == 0  # the original is not what an int8 store returns
    first = cache.get(key)
    assert cache.get(key) is first and cache.counters["hits"] == 1
    assert cache.get_many([key], quantization="int4") == [None]  # another form, another entry
