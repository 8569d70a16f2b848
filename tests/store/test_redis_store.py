"""RedisStore against a real redis-server: round trip, pipelining, TTL, auth, damage and network faults."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis
import torch

from kvpacket_rag.errors import CorruptPacketError, PacketNotFoundError
from kvpacket_rag.store import MemoryCache, StoreError, StoreUnavailableError, open_store
from kvpacket_rag.store.redis_store import RedisStore, redact


def assert_same(got, want) -> None:
    assert got.key == want.key
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert torch.equal(got.token_ids, want.token_ids)


def test_round_trip_pipelined_get_many(redis_url, redis_prefix, packets):
    store = open_store(redis_url, prefix=redis_prefix)
    assert isinstance(store, RedisStore)
    keys = store.put_many(packets[:3])
    assert store.put(packets[0]) == keys[0] and store.counters["puts"] == 3  # SET NX: second put is a no-op
    got = store.get_many([keys[2], packets[3].key, keys[0]])
    assert got[1] is None
    assert_same(got[0], packets[2])
    assert_same(got[2], packets[0])
    assert sorted(store.keys()) == sorted(keys) and store.contains(keys[1]) and not store.contains(packets[3].key)
    stats = store.stats()
    assert stats["backend"] == "redis" and stats["packets"] == 3
    assert stats["bytes"] == sum(len(redis.Redis.from_url(redis_url).get(redis_prefix + k)) for k in keys)
    assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / sum(p.length for p in packets[:3]), abs=0.01)
    assert store.delete(keys[0]) and not store.delete(keys[0])
    with pytest.raises(PacketNotFoundError):
        store.get(keys[0])


def test_prefixes_isolate_stores_and_ttl_is_set(redis_url, redis_prefix, packets):
    a = RedisStore(redis_url, prefix=redis_prefix, ttl=600)
    b = RedisStore(redis_url, prefix=redis_prefix + "other:")
    key = a.put(packets[0])
    assert b.get_many([key]) == [None] and list(b.keys()) == []
    assert 0 < redis.Redis.from_url(redis_url).pttl(redis_prefix + key) <= 600_000
    with pytest.raises(ValueError, match="ttl"):
        RedisStore(redis_url, ttl=0)


def test_quantized_forms_are_separate_entries(redis_url, redis_prefix, make_packet):
    packet = make_packet(5, dtype=torch.bfloat16)
    int8 = RedisStore(redis_url, prefix=redis_prefix, quantization="int8")
    exact = RedisStore(redis_url, prefix=redis_prefix)
    key = int8.put(packet)
    assert exact.get_many([key]) == [None]
    got = int8.get(key)
    assert got.key == key and got.dtype == torch.bfloat16
    assert (got.values.float() - packet.values.float()).abs().max() < 0.05 * packet.values.float().abs().max()
    assert exact.stats()["by_quantization"]["int8"]["packets"] == 1


@pytest.mark.parametrize("how", ["truncated", "flipped", "garbage", "foreign"])
def test_damaged_or_foreign_value_is_refused_and_quarantined(redis_url, redis_prefix, packets, make_packet, how):
    store = RedisStore(redis_url, prefix=redis_prefix)
    keys = store.put_many(packets[:2])
    raw = redis.Redis.from_url(redis_url)
    data = bytearray(raw.get(redis_prefix + keys[0]))
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        data[-30] ^= 0x01
    elif how == "garbage":
        data = bytearray(b"garbage" * 100)
    else:
        data = bytearray(make_packet(0, adapter="adapter-b").to_bytes())  # valid, but another adapter's packet
    raw.set(redis_prefix + keys[0], bytes(data))
    assert [b.key for b in store.verify()] == [keys[0]]
    with pytest.raises(CorruptPacketError, match="quarantine"):
        store.get_many(keys)
    assert not store.contains(keys[0]) and store.stats()["quarantined_entries"] == 1
    assert_same(store.get(keys[1]), packets[1])
    assert store.verify() == [] and store.gc()["quarantined_files"] == 1
    assert store.stats()["quarantined_entries"] == 0


def test_password_in_url(start_redis, packets):
    url = start_redis("--requirepass", "s3cret")
    with pytest.raises(StoreError, match="credentials") as error:
        RedisStore(url)
    with pytest.raises(StoreError, match="credentials") as error:
        RedisStore(url.replace("redis://", "redis://:wrong@"))
    assert "wrong" not in str(error.value)  # passwords never appear in messages
    store = RedisStore(url.replace("redis://", "redis://:s3cret@"))
    assert "s3cret" not in repr(store) and "s3cret" not in store.stats()["location"]
    assert_same(store.get(store.put(packets[0])), packets[0])
    assert redact("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"


def test_unreachable_server_fails_fast_with_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="cannot reach Redis"):
            RedisStore(f"redis://127.0.0.1:{port}/0", connect_timeout=0.5)
    assert time.monotonic() - start < 3


class FakeServer:
    """A loopback TCP server speaking just enough RESP: it answers connection set-up, then misbehaves on GET."""

    def __init__(self, on_get: str):
        self.on_get = on_get
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.clients: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.clients.append(client)
            threading.Thread(target=self._talk, args=(client,), daemon=True).start()

    def _talk(self, client: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\r\n" in buffer:
                    command, buffer = self._command(buffer)
                    if command is None:
                        break
                    if command == b"GET":
                        if self.on_get == "drop":  # a bulk reply of 1 MB, cut after a few bytes
                            client.sendall(b"$1048576\r\n" + b"x" * 1000)
                            client.shutdown(socket.SHUT_RDWR)
                            client.close()
                        return  # "hang": never answer
                    if command == b"HELLO":  # RESP3 handshake: a map with the protocol version
                        client.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                    else:
                        client.sendall(b"+PONG\r\n" if command == b"PING" else b"+OK\r\n")
        except OSError:
            return

    @staticmethod
    def _command(buffer: bytes):
        """Parse one RESP array command; return (name, rest) or (None, buffer) if incomplete."""
        lines = buffer.split(b"\r\n")
        if not lines[0].startswith(b"*") or len(lines) < 3:
            return None, buffer
        count = int(lines[0][1:])
        if len(lines) < 1 + 2 * count + 1:
            return None, buffer
        rest = b"\r\n".join(lines[1 + 2 * count :])
        return lines[2].upper(), rest

    def close(self) -> None:
        self.sock.close()
        for client in self.clients:
            client.close()


@pytest.mark.parametrize("on_get", ["hang", "drop"])
def test_server_hanging_or_dropping_mid_request_gives_a_clear_error_and_caches_nothing(on_get):
    server = FakeServer(on_get)
    try:
        store = RedisStore(server.url, socket_timeout=0.3, retries=0)
        cache = MemoryCache(store, max_bytes=1 << 30)
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="did not answer" if on_get == "hang" else "cannot reach"):
            cache.get_many(["ab" * 32, "cd" * 32])
        assert time.monotonic() - start < 3
        assert len(cache) == 0 and cache.counters["misses"] == 2
    finally:
        server.close()


def test_memory_cache_over_redis(redis_url, redis_prefix, packets):
    store = MemoryCache(RedisStore(redis_url, prefix=redis_prefix), max_bytes=10 * packets[0].nbytes)
    keys = [store.put(p) for p in packets]
    redis.Redis.from_url(redis_url).delete(*[redis_prefix + k for k in keys])  # served from memory now
    for packet, got in zip(packets, store.get_many(keys)):
        assert got is packet
    assert store.stats()["cache"]["hits"] == 4 and store.stats()["packets"] == 0


@pytest.mark.parametrize("form", ["none", "int8", "int4"])
def test_get_many_over_a_unix_socket_returns_what_a_local_store_returns(tmp_path, form, make_packet, start_redis):
    """Same packets, same forms, two backends: Redis over a Unix socket (pipelined replies decoded in place)
    and a LocalStore (mapped files) give the same tensors."""
    from kvpacket_rag.store import LocalStore

    socket_path = tmp_path / "redis.sock"
    start_redis("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    packets = [make_packet(seed, tokens=40, dtype=torch.bfloat16) for seed in range(3)]
    redis_store = open_store(f"unix://{socket_path}", prefix="u:", quantization=form, read_size=8192)
    local = LocalStore(tmp_path / "local", quantization=form)
    keys = redis_store.put_many(packets)
    assert local.put_many(packets) == keys and redis_store.put_many(packets) == keys
    got, want = redis_store.get_many(keys[::-1]), local.get_many(keys[::-1])
    for a, b in zip(got, want):
        assert type(a) is type(b) and a.encoding == form
        assert_same(a, b)
    redis_store.close()
