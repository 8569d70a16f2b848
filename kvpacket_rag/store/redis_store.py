"""RedisStore: packets shared by many processes or machines through a Redis server.

Each entry is one Redis string holding the packet's ``kvpacket/1`` bytes under
``<prefix><key>`` (``<prefix><key>.int8`` / ``.int4`` for quantized forms). A SET is atomic, so
readers never see a partial packet; every read verifies the digest and the content address;
damaged values are renamed to ``<prefix>quarantine:…`` (kept a week) and reported.

Recency lives in the sorted set ``<prefix>last-used`` (entry name -> last put or get, Unix
seconds), because Redis's own idle clock is reset by any read, including the header reads of
`stats` and `gc`. Entries without a score (written by an older version) start from ``OBJECT
IDLETIME``, read before anything else touches them. `gc` only ever removes string keys under the
prefix whose names are entry names or ``quarantine:`` names, so the prefix may not be empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis as redis_lib
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import CorruptPacketError, PacketNotFoundError
from ..packet import KVPacket, encode_packet
from ..quantize import check_quantization
from .base import (BadEntry, PersistentStore, StoreError, StoreUnavailableError, check_form, resolve_signing_key,
                   validate_key)
from .entries import EntryInfo, decode_entry, entry_name, header_info, parse_entry_name, summarize

log = logging.getLogger(__name__)

QUARANTINE_TTL_S = 7 * 24 * 3600
_HEADER_PROBE = 8
LAST_USED = "last-used"
_SECRET_PARAMS = {"password", "pass", "pwd", "token"}


def redact(url: str) -> str:
    """``url`` with its password (in the user part or a ``?password=`` parameter) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = [(name, "***" if name.lower() in _SECRET_PARAMS else value)
                 for name, value in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


class RedisStore(PersistentStore):
    """Packets in Redis, for many serving processes sharing one packet set.

    Args:
        url: ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS) or ``unix:///path.sock``.
        prefix: prepended to every Redis key (several stores can share one database).
        ttl: seconds an entry lives after it is written (None: until deleted or evicted by Redis).
        socket_timeout: seconds to wait for the server on each socket read/write.
        connect_timeout: seconds to wait for a connection.
        retries: reconnect-and-retry attempts after a connection error (a call fails after at most
            ``retries + 1`` timeouts).
        read_size: bytes per socket read. Packets are megabytes, so reads larger than redis-py's
            64 KiB default mean fewer system calls per reply.
        quantization: form `put` writes and `get` reads by default (see `LocalStore`).
        on_corrupt: ``raise`` or ``miss``, as for `LocalStore`.
        signing_key: sign every packet written and refuse unsigned or wrongly signed ones, as for
            `LocalStore` (default: the ``KVPACKET_STORE_KEY`` environment variable). Without it,
            anyone who can write to the server can plant packets.

    Raises:
        ValueError: an empty prefix, a bad option or a short signing key.
        StoreUnavailableError: the server cannot be reached or does not answer in time.
        StoreError: the server refused the credentials in ``url``.

    Fastest on one machine: a Unix socket (``unix:///run/redis/redis.sock``) and, on the server,
    ``io-threads 2`` with ``io-threads-do-reads yes`` (see the store benchmark).

    Example:
        >>> store = RedisStore("redis://:secret@cache.internal:6379/0", ttl=7 * 86400)
    """

    def __init__(self, url: str = "redis://localhost:6379/0", prefix: str = "kvpacket:", ttl: float | None = None,
                 socket_timeout: float = 5.0, connect_timeout: float = 2.0, retries: int = 1, read_size: int = 1 << 20,
                 quantization: str = "none", on_corrupt: str = "raise", signing_key: str | bytes | None = None):
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty: gc and quarantine act on every key under it; "
                             "use one such as 'kvpacket:'")
        if on_corrupt not in ("raise", "miss"):
            raise ValueError(f"on_corrupt must be 'raise' or 'miss', got {on_corrupt!r}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be positive seconds or None, got {ttl}")
        if socket_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("socket_timeout and connect_timeout must be positive seconds")
        if read_size < 4096:
            raise ValueError(f"read_size must be at least 4096 bytes, got {read_size}")
        self.url = redact(url)
        self.prefix = prefix
        self.ttl = ttl
        self.socket_timeout = socket_timeout
        self.quantization = check_quantization(quantization)
        self.on_corrupt = on_corrupt
        self._signing_key = resolve_signing_key(signing_key)
        self._used = prefix + LAST_USED
        self.counters = {"puts": 0, "hits": 0, "misses": 0, "corrupt": 0}
        try:
            self._client = redis_lib.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                retry=Retry(NoBackoff(), retries), health_check_interval=30, socket_read_size=read_size)
        except ValueError as error:
            raise StoreError(f"bad Redis URL {self.url}: {error}; use redis://[user:password@]host:port/db") from None
        with self._calling("connecting"):
            self._client.ping()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, quantization={self.quantization!r})"

    # ---- errors ----------------------------------------------------------------------------

    @contextmanager
    def _calling(self, what: str):
        try:
            yield
        except redis_lib.exceptions.AuthenticationError as error:
            raise StoreError(f"Redis at {self.url} refused the credentials while {what} ({error}); "
                             "put them in the URL: redis://user:password@host:port/db") from None
        except redis_lib.exceptions.TimeoutError:
            raise StoreUnavailableError(f"Redis at {self.url} did not answer within {self.socket_timeout}s while "
                                        f"{what}; check the server, or raise socket_timeout") from None
        except redis_lib.exceptions.ConnectionError as error:
            raise StoreUnavailableError(f"cannot reach Redis at {self.url} while {what} ({error}); start "
                                        "redis-server or fix the URL") from None
        except redis_lib.exceptions.OutOfMemoryError as error:
            raise StoreError(f"Redis at {self.url} is out of memory and refused {what} ({error}); nothing was "
                             "written. Raise maxmemory, set an eviction policy, or run `kvpacket store gc`") from None
        except redis_lib.exceptions.ReadOnlyError as error:
            raise StoreError(f"Redis at {self.url} is a read-only replica and refused {what} ({error}); point the "
                             "URL at the primary to write") from None
        except redis_lib.exceptions.ResponseError as error:
            if "NOAUTH" in str(error) or "WRONGPASS" in str(error):
                raise StoreError(f"Redis at {self.url} needs credentials ({error}); "
                                 "use redis://user:password@host:port/db") from None
            raise StoreError(f"Redis at {self.url} refused {what}: {error}") from None

    # ---- reading ---------------------------------------------------------------------------

    def _name(self, key: str, form: str) -> str:
        return self.prefix + entry_name(key, form)

    def get(self, key: str, *, quantization: str | None = None) -> KVPacket:
        """The packet under ``key`` (see `LocalStore.get` for errors; plus `StoreUnavailableError`)."""
        packet = self.get_many([key], quantization=quantization)[0]
        if packet is None:
            raise PacketNotFoundError(f"packet {key[:12]}… is not in Redis at {self.url}; build it first")
        return packet

    def get_many(self, keys: Sequence[str], *, quantization: str | None = None) -> list[KVPacket | None]:
        """Packets for ``keys`` in order, None where missing: one pipelined round trip.

        If the connection fails mid-reply nothing is returned (the call raises), so no partial
        packet reaches a caller or a cache in front of this store.
        """
        form = self._form(quantization)
        names = [self._name(validate_key(key), form) for key in keys]
        if not names:
            return []
        with self._calling(f"reading {len(names)} packets"):
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            pipe.zadd(self._used, dict.fromkeys(names, time.time()), xx=True)  # recency of stored entries only
            replies = pipe.execute(raise_on_error=False)
            values = [None if _wrong_type(v) else v for v in replies[:-1]]  # not ours: a miss
            for value in values:
                if isinstance(value, Exception):
                    raise value
        if isinstance(replies[-1], Exception):  # a read-only replica: reads work, recency is not recorded
            log.debug("Redis at %s did not record recency: %s", self.url, replies[-1])
        out: list[KVPacket | None] = []
        for key, name, value in zip(keys, names, values):
            packet = None
            if value is not None:
                try:
                    packet = decode_entry(value, key, form, self._signing_key)
                except CorruptPacketError as damage:
                    self._quarantine(name, str(damage))
                    if self.on_corrupt == "raise":
                        raise type(damage)(
                            f"packet {key[:12]}… in Redis at {self.url} is damaged ({damage}); it was moved to "
                            f"{self.prefix}quarantine:, so the next lookup misses and rebuilds it") from None
            out.append(packet)
        hits = sum(p is not None for p in out)
        self.counters["hits"] += hits
        self.counters["misses"] += len(out) - hits
        return out

    def _quarantine(self, name: str, reason: str) -> None:
        self.counters["corrupt"] += 1
        log.warning("packet entry %s in Redis at %s is damaged: %s; quarantined", name, self.url, reason)
        target = f"{self.prefix}quarantine:{name[len(self.prefix):]}:{time.time_ns()}"
        try:
            with self._calling("quarantining a damaged packet"):
                pipe = self._client.pipeline(transaction=True)
                pipe.rename(name, target)
                pipe.expire(target, QUARANTINE_TTL_S)
                pipe.zrem(self._used, name)
                pipe.execute()
        except StoreError as error:  # already gone or renamed by another reader
            log.warning("could not quarantine %s: %s", name, error)

    # ---- writing ---------------------------------------------------------------------------

    def put(self, packet: KVPacket, *, quantization: str | None = None) -> str:
        """Store ``packet`` (SET NX: an existing entry is left as it is); return its key."""
        return self.put_many([packet], quantization=quantization)[0]

    def put_many(self, packets, *, quantization: str | None = None, batch: int = 8) -> list[str]:
        """Store packets, ``batch`` per pipelined round trip; return their keys."""
        form = self._form(quantization)
        keys: list[str] = []
        pending: list[tuple[str, bytes]] = []
        for packet in packets:
            keys.append(packet.key)
            pending.append((self._name(packet.key, form), encode_packet(packet, form, self._signing_key)))
            if len(pending) >= batch:
                self._set(pending)
                pending = []
        if pending:
            self._set(pending)
        return keys

    def _set(self, items: list[tuple[str, bytes]]) -> None:
        ttl_ms = None if self.ttl is None else max(1, int(self.ttl * 1000))
        with self._calling(f"writing {len(items)} packets"):
            pipe = self._client.pipeline(transaction=False)
            for name, data in items:
                pipe.set(name, data, nx=True, px=ttl_ms)
            pipe.zadd(self._used, {name: time.time() for name, _ in items}, nx=True)
            written = pipe.execute()[:-1]
        self.counters["puts"] += sum(bool(w) for w in written)

    def delete(self, key: str, *, quantization: str | None = None) -> bool:
        name = self._name(validate_key(key), self._form(quantization))
        with self._calling("deleting a packet"):
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(name)
            pipe.zrem(self._used, name)
            return bool(pipe.execute()[0])

    # ---- listing, stats, maintenance ------------------------------------------------------

    def contains(self, key: str, *, quantization: str | None = None) -> bool:
        with self._calling("looking up a packet"):
            return bool(self._client.exists(self._name(validate_key(key), self._form(quantization))))

    def _scan(self) -> Iterator[tuple[str, str, str]]:
        """``(redis name, key, form)`` of every entry under the prefix."""
        pattern = _glob_escape(self.prefix) + "*"
        with self._calling("listing packets"):
            for raw in self._client.scan_iter(match=pattern, count=1000):
                try:
                    name = raw.decode() if isinstance(raw, bytes) else raw
                except UnicodeDecodeError:
                    continue  # not a name this store writes
                parsed = parse_entry_name(name[len(self.prefix):])
                if parsed is not None:
                    yield name, *parsed

    def keys(self, *, quantization: str | None = None) -> Iterator[str]:
        """Keys stored in the given form (default: the store's), sorted."""
        form = self._form(quantization)
        found = [(name, key) for name, key, f in self._scan() if f == form]
        with self._calling("listing packets"):
            pipe = self._client.pipeline(transaction=False)
            for name, _ in found:
                pipe.type(name)
            types = pipe.execute()
        return iter(sorted(key for (_, key), kind in zip(found, types) if kind in (b"string", "string")))

    def entries(self) -> list[dict]:
        """Every entry of every form: header fields (see `EntryInfo`) plus ``name`` and ``idle_s``.

        Idle time comes from ``<prefix>last-used``, or for entries not in it from ``OBJECT IDLETIME``
        read before the headers (header reads reset Redis's idle clock); such entries are then added
        to it. Keys under the prefix that are not strings are skipped.
        """
        found = list(self._scan())
        out: list[dict] = []
        for start in range(0, len(found), 256):
            out += self._entries(found[start : start + 256])
        return out

    def _entries(self, batch: list[tuple[str, str, str]]) -> list[dict]:
        now = time.time()
        with self._calling("reading packet headers"):
            pipe = self._client.pipeline(transaction=False)
            for name, _, _ in batch:  # none of these touch the key's idle clock
                pipe.type(name)
                pipe.object("idletime", name)
                pipe.zscore(self._used, name)
            probes = pipe.execute(raise_on_error=False)
            strings = [(n, item) for n, item in enumerate(batch) if probes[3 * n] in (b"string", "string")]
            idle = {item[0]: _idle(probes[3 * n + 2], probes[3 * n + 1], now) for n, item in strings}
            unscored = {item[0]: now - idle[item[0]] for n, item in strings if probes[3 * n + 2] is None}
            pipe = self._client.pipeline(transaction=False)
            for _, (name, _, _) in strings:
                pipe.getrange(name, 0, _HEADER_PROBE - 1)
                pipe.strlen(name)
            sizes = pipe.execute(raise_on_error=False)
            pipe = self._client.pipeline(transaction=False)
            for n, (_, (name, _, _)) in enumerate(strings):
                head = sizes[2 * n]
                size = int.from_bytes(head, "little") if isinstance(head, bytes) and len(head) == 8 else 0
                pipe.getrange(name, 0, _HEADER_PROBE + min(size, 1 << 24) - 1)
            if unscored:
                pipe.zadd(self._used, unscored, nx=True)
            headers = pipe.execute(raise_on_error=False)
        out = []
        for n, (_, (name, key, form)) in enumerate(strings):
            size = sizes[2 * n + 1] if isinstance(sizes[2 * n + 1], int) else 0
            entry = {"key": key, "quantization": form, "name": name, "size": size, "idle_s": idle[name]}
            try:
                info = header_info(key, form, headers[n], size=size)
                entry.update({f: getattr(info, f) for f in EntryInfo.__dataclass_fields__ if f != "size"})
            except (CorruptPacketError, TypeError):
                entry["damaged_header"] = True
            out.append(entry)
        return out

    def stats(self) -> dict:
        """Packets, bytes, positions, bytes/token (total and per quantization), counters, server memory."""
        entries = [e for e in self.entries() if "positions" in e]
        with self._calling("reading server info"):
            memory = self._client.info("memory").get("used_memory")
            quarantined = sum(1 for _ in self._client.scan_iter(match=_glob_escape(self.prefix) + "quarantine:*"))
        return {"backend": "redis", "location": self.url, "prefix": self.prefix, "quantization": self.quantization,
                "signed": self._signing_key is not None,
                **summarize([(e["quantization"], e["size"], e["positions"]) for e in entries]),
                "model_adapter_pairs": len({(e["model_fingerprint"], e["adapter_fingerprint"]) for e in entries}),
                "quarantined_entries": quarantined, "server_used_memory": memory, **self.counters}

    def verify(self, quarantine: bool = False) -> list[BadEntry]:
        """Re-read every entry and check its checksum and content address; optionally quarantine bad ones."""
        bad: list[BadEntry] = []
        for name, key, form in list(self._scan()):
            with self._calling("reading a packet"):
                value = self._client.pipeline(transaction=False).get(name).execute(raise_on_error=False)[0]
            if value is None or _wrong_type(value):
                continue  # expired or deleted meanwhile, or a key of another type under the prefix
            if isinstance(value, Exception):
                with self._calling("reading a packet"):
                    raise value
            try:
                decode_entry(value, key, form, self._signing_key)
            except CorruptPacketError as damage:
                if quarantine:
                    self._quarantine(name, str(damage))
                bad.append(BadEntry(key, form, str(damage), "quarantined" if quarantine else "reported"))
        return bad

    def _collect(self, doomed: list[dict], dry_run: bool) -> dict:
        """Delete the doomed entries and quarantined entries; drop recency scores of what is gone."""
        names = [entry["name"] for entry in doomed]
        with self._calling("collecting garbage"):
            quarantined = [name for name in self._client.scan_iter(match=_glob_escape(self.prefix) + "quarantine:*")
                           if self._client.type(name) in (b"string", "string")]
            if not dry_run and (names or quarantined):
                self._client.delete(*names, *quarantined)
            if not dry_run:
                self._prune_recency(names)
        return {"temp_files": 0, "quarantined_files": len(quarantined)}

    def _prune_recency(self, removed) -> None:
        """Drop recency scores of removed entries and of entries Redis expired or evicted."""
        members = self._client.zrange(self._used, 0, -1)
        pipe = self._client.pipeline(transaction=False)
        for member in members:
            pipe.exists(member)
        gone = [m for m, exists in zip(members, pipe.execute()) if not exists]
        stale = [*removed, *gone]
        for start in range(0, len(stale), 1000):
            self._client.zrem(self._used, *stale[start : start + 1000])

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def _form(self, quantization: str | None) -> str:
        return check_form(self, quantization)


def _wrong_type(reply) -> bool:
    """Whether ``reply`` is Redis's WRONGTYPE error (a key of another type under an entry name)."""
    return isinstance(reply, redis_lib.exceptions.ResponseError) and str(reply).startswith("WRONGTYPE")


def _idle(score, idletime, now: float) -> float:
    """Seconds since last use: from the recency score, else Redis's idle time, else 0 (unknown: assume fresh)."""
    if isinstance(score, (int, float)):
        return max(0.0, now - float(score))
    return float(idletime) if isinstance(idletime, int) else 0.0


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
