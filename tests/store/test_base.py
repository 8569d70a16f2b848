"""The store interface: one garbage-collection policy for every persistent backend, one form argument everywhere."""

from __future__ import annotations

import pytest

from kvpacket_rag.store import InMemoryStore, MemoryCache, select_garbage


def entry(name: str, idle_s: float, size: int = 10, model: str = "m", adapter: str = "a", **extra) -> dict:
    return {"key": name, "quantization": "none", "size": size, "idle_s": idle_s, "model_fingerprint": model,
            "tokenizer_fingerprint": "t", "adapter_fingerprint": adapter, **extra}


def test_select_garbage_takes_foreign_and_old_entries_then_the_least_recently_used():
    entries = [entry("new", 1), entry("old", 500), entry("mid", 50), entry("alien", 2, model="other"),
               entry("broken", 3, damaged_header=True)]
    names = lambda doomed: [e["key"] for e in doomed]  # noqa: E731
    assert names(select_garbage(entries)) == ["broken"]  # an unreadable header always goes
    assert names(select_garbage(entries, keep_model="m")) == ["broken", "alien"]
    assert names(select_garbage(entries, max_age_s=100)) == ["old", "broken"]
    assert names(select_garbage(entries, max_bytes=15)) == ["broken", "old", "mid", "alien"]  # most idle first
    assert names(select_garbage(entries, keep_adapters=["b"])) == ["old", "mid", "broken", "alien", "new"]


def test_a_kept_adapter_keeps_its_packets_built_after_neighbour_contexts():
    entries = [entry("plain", 1, adapter="a@p"), entry("near", 2, adapter="a@p~f00d:beef"),
               entry("other", 3, adapter="b@p~f00d:beef")]
    assert [e["key"] for e in select_garbage(entries, keep_adapters=["a@p"])] == ["other"]


def test_in_memory_store_refuses_quantized_forms_and_the_cache_passes_forms_through(packets):
    store = InMemoryStore()
    with pytest.raises(ValueError, match="no int8 form"):
        store.put(packets[0], quantization="int8")
    cache = MemoryCache(store, max_bytes=1 << 20)
    assert cache.quantization == "none"
    key = cache.put(packets[0], quantization="none")
    assert cache.get(key) is packets[0] and cache.get_many([key], quantization="none")[0] is packets[0]
    with pytest.raises(ValueError, match="no int4 form"):
        cache.get_many([key], quantization="int4")
    cache.close()  # every store can be closed
    assert len(cache) == 0


def test_in_memory_store_with_a_byte_budget_drops_the_least_recently_used(packets):
    size = packets[0].nbytes
    store = InMemoryStore(max_bytes=2 * size)
    first, second = store.put(packets[0]), store.put(packets[1])
    store.get(first)  # now the most recently used
    third = store.put(packets[2])
    assert store.contains(first) and store.contains(third) and not store.contains(second)
    assert store.stats()["bytes"] == 2 * size and store.counters["evictions"] == 1
    assert store.delete(first) and store.stats()["bytes"] == size
    tiny = InMemoryStore(max_bytes=size - 1)
    assert not tiny.contains(tiny.put(packets[3]))  # accepted, too large to keep
    with pytest.raises(ValueError, match="max_bytes"):
        InMemoryStore(max_bytes=-1)


def test_engine_default_store_is_bounded(tiny_llama):
    from kvpacket_rag.engine import DEFAULT_STORE_BYTES, PacketEngine

    assert PacketEngine(tiny_llama, adapter=None).store.max_bytes == DEFAULT_STORE_BYTES


def test_a_missing_redis_client_names_the_extra_to_install(monkeypatch):
    import sys

    from kvpacket_rag.store import open_store

    monkeypatch.setitem(sys.modules, "redis", None)  # as if the client were not installed
    monkeypatch.delitem(sys.modules, "kvpacket_rag.store.redis_store", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"kvpacket-rag\[redis\]"):
        open_store("redis://localhost:6379/0")
