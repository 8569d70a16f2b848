"""RedisStore faults against a real redis-server: idle-based gc, shared databases, refused writes, signatures."""

from __future__ import annotations

import time

import pytest
import redis

from kvpacket_rag.errors import UntrustedPacketError
from kvpacket_rag.store import StoreError
from kvpacket_rag.store.redis_store import RedisStore, redact

KEY = "a-test-secret-of-enough-bytes"


def test_gc_by_idle_time_is_not_fooled_by_stats_or_gc(redis_url, redis_prefix, packets):
    store = RedisStore(redis_url, prefix=redis_prefix)
    old, fresh = packets[0].key, packets[1].key
    store.put(packets[0])
    store.put(packets[1])
    time.sleep(1.2)
    store.get(fresh)  # used now; `old` last used 1.2 s ago
    store.stats()  # reads every header: must not make `old` look fresh
    assert store.gc(max_age_s=60.0)["removed"] == 0
    assert store.gc(max_age_s=1.0, dry_run=True)["removed"] == 1
    result = store.gc(max_age_s=1.0)
    assert result["removed"] == 1 and list(store.keys()) == [fresh]
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(redis_prefix + "last-used") == 1  # no score left behind for the removed entry


def test_max_bytes_removes_least_recently_used_first(redis_url, redis_prefix, packets):
    store = RedisStore(redis_url, prefix=redis_prefix)
    for packet in packets:
        store.put(packet)
        time.sleep(0.05)
    store.get(packets[0].key)  # the oldest put is now the most recently used
    size = store.stats()["bytes"] // 4
    store.gc(max_bytes=2 * size)
    assert sorted(store.keys()) == sorted([packets[0].key, packets[3].key])


def test_entries_written_without_recency_age_by_redis_idle_time(redis_url, redis_prefix, packets):
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=redis_prefix)
    client.set(redis_prefix + packets[0].key, packets[0].to_bytes())  # as an older version wrote it
    time.sleep(2.1)  # OBJECT IDLETIME counts whole seconds
    assert store.stats()["packets"] == 1  # reads the header, records the idle time first
    assert store.gc(max_age_s=1.0)["removed"] == 1


def test_empty_prefix_is_refused_and_gc_keeps_to_its_own_keys(redis_url, redis_prefix, packets):
    with pytest.raises(ValueError, match="prefix must not be empty"):
        RedisStore(redis_url, prefix="")
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.put(packets[0])
    other = "a" * 64
    client.set(other, b"another application's value")  # outside the prefix, looks like an entry
    client.hset(redis_prefix + "b" * 64, "field", "value")  # not a string, under the prefix
    client.sadd(redis_prefix + "quarantine:set", "x")
    client.set(redis_prefix + "\xff-not-utf8".encode("latin-1").decode("latin-1"), b"x")
    client.set(redis_prefix.encode() + b"\xff\xfe", b"undecodable name")
    assert store.stats()["packets"] == 1
    assert [b.key for b in store.verify()] == []
    store.gc(max_bytes=0)
    assert client.get(other) == b"another application's value"
    assert client.hget(redis_prefix + "b" * 64, "field") == b"value"
    assert client.exists(redis_prefix + "quarantine:set")
    assert list(store.keys()) == []


def test_password_in_the_query_string_is_redacted(start_redis, packets):
    url = start_redis("--requirepass", "s3cret")
    store = RedisStore(url + "?password=s3cret")
    assert "s3cret" not in store.url and "s3cret" not in repr(store) and "s3cret" not in str(store.stats())
    assert redact("redis://h:1/0?password=pw&db=2") == "redis://h:1/0?password=***&db=2"
    assert redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_refused_writes_raise_store_error_and_reads_still_work(start_redis, packets, refusal):
    url = start_redis("--maxmemory-policy", "noeviction")
    store = RedisStore(url)
    store.put(packets[0])
    client = redis.Redis.from_url(url)
    if refusal == "oom":
        client.config_set("maxmemory", "1")  # already past the limit: every write is refused
    else:
        client.config_set("replica-read-only", "yes")
        client.replicaof("127.0.0.1", "1")  # a replica of an unreachable primary: read-only, data kept
    with pytest.raises(StoreError, match="out of memory|read-only replica"):
        store.put(packets[1])
    assert store.get(packets[0].key).key == packets[0].key  # reads go on (recency is not recorded)
    if refusal == "readonly":
        client.replicaof("no", "one")


def test_eviction_by_redis_is_a_miss(start_redis, make_packet):
    url = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    store = RedisStore(url)
    keys = store.put_many(make_packet(seed, tokens=40) for seed in range(300))  # ~3 MB: Redis evicts some
    got = store.get_many(keys)
    kept = sum(p is not None for p in got)
    assert 0 < kept < len(keys) and store.stats()["corrupt"] == 0  # evicted entries are misses
    store.gc()
    assert redis.Redis.from_url(url).zcard("kvpacket:last-used") == len(list(store.keys()))


def test_a_signed_redis_store_refuses_planted_packets(redis_url, redis_prefix, packets):
    signed = RedisStore(redis_url, prefix=redis_prefix, signing_key=KEY)
    plain = RedisStore(redis_url, prefix=redis_prefix, signing_key="")
    signed.put(packets[0])
    plain.put(packets[1])  # anyone who can write to the server
    assert signed.get(packets[0].key).key == packets[0].key
    with pytest.raises(UntrustedPacketError, match="not signed"):
        signed.get(packets[1].key)
    assert signed.get_many([packets[1].key]) == [None]
    assert [b.key for b in signed.verify()] == [] and plain.get(packets[0].key).key == packets[0].key
