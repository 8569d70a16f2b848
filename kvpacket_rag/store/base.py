"""The packet store interface: content-addressed, immutable packets."""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from ..errors import KVPacketError, PacketNotFoundError
from ..packet import KVPacket
from ..quantize import check_quantization

_KEY = re.compile(r"[0-9a-f]{64}")


class StoreError(KVPacketError):
    """A store cannot do what was asked (read-only directory, disk full, not a store, bad credentials)."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached or did not answer in time."""


SIGNING_KEY_ENV = "KVPACKET_STORE_KEY"
_MIN_SIGNING_KEY = 16


def resolve_signing_key(signing_key: str | bytes | None) -> bytes | None:
    """The key a persistent store signs and checks packets with.

    ``signing_key`` when given (an empty value turns signing off), else the ``KVPACKET_STORE_KEY``
    environment variable, else None (no signatures: damage is still caught by each file's digest).

    Raises:
        ValueError: a key shorter than 16 bytes.
    """
    value = os.environ.get(SIGNING_KEY_ENV) if signing_key is None else signing_key
    if not value:
        return None
    data = value.encode() if isinstance(value, str) else bytes(value)
    if len(data) < _MIN_SIGNING_KEY:
        raise ValueError(f"the store signing key has {len(data)} bytes; use a random secret of at least "
                         f"{_MIN_SIGNING_KEY} (e.g. `openssl rand -hex 32`) in {SIGNING_KEY_ENV} or signing_key=")
    return data


def validate_key(key: str) -> str:
    """Return ``key`` if it is a 64-char lowercase hex packet key, else raise ValueError.

    Keys become file names and Redis keys; nothing else (no user text) may.
    """
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"invalid packet key {key!r}: expected 64 lowercase hex characters (a packet.key)")
    return key


class PacketStore(ABC):
    """Where packets live between ingestion and questions.

    Every store keeps packets in a default form, ``quantization`` (``none``, ``int8`` or ``int4``),
    and each read/write method takes ``quantization=`` to name another form for one call; each
    (key, form) pair is its own entry. A store that cannot hold a form raises ValueError.

    Invariants every implementation keeps:
      - ``put(p)`` stores ``p`` under ``p.key``; a key always maps to the same bytes, so putting
        an existing key is a no-op.
      - ``get`` returns a packet equal to the one put (for a quantized form: its quantized copy,
        a `QuantizedPacket` under the same key), or raises `PacketNotFoundError` /
        `CorruptPacketError`; it never returns a partial or altered packet.
      - Keys are validated with `validate_key` before any I/O.
    """

    quantization: str = "none"

    @abstractmethod
    def get(self, key: str, *, quantization: str | None = None) -> KVPacket:
        """The packet stored under ``key``."""

    def get_many(self, keys: Sequence[str], *, quantization: str | None = None) -> list[KVPacket | None]:
        """Packets for ``keys`` in order, None where a key is missing."""
        out: list[KVPacket | None] = []
        for key in keys:
            try:
                out.append(self.get(key, quantization=quantization))
            except PacketNotFoundError:
                out.append(None)
        return out

    @abstractmethod
    def put(self, packet: KVPacket, *, quantization: str | None = None) -> str:
        """Store ``packet``; return its key."""

    def put_many(self, packets: Iterable[KVPacket], *, quantization: str | None = None) -> list[str]:
        return [self.put(packet, quantization=quantization) for packet in packets]

    @abstractmethod
    def contains(self, key: str, *, quantization: str | None = None) -> bool:
        """Whether ``key`` is stored."""

    @abstractmethod
    def delete(self, key: str, *, quantization: str | None = None) -> bool:
        """Remove ``key``; True if it was there."""

    @abstractmethod
    def keys(self, *, quantization: str | None = None) -> Iterator[str]:
        """All stored keys (of the given form, default the store's)."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters and sizes (at least ``packets`` and ``bytes``)."""

    def close(self) -> None:
        """Release connections and handles (packets already returned stay valid). Default: nothing to release."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def __iter__(self) -> Iterator[str]:
        return self.keys()


@dataclass(frozen=True)
class BadEntry:
    """An entry `verify` found wrong: ``reason`` says what, ``action`` what was done about it."""

    key: str
    quantization: str
    reason: str
    action: str = "reported"


class PersistentStore(PacketStore):
    """A store that outlives the process (a directory, a Redis server): entries can be listed,
    checked and collected.

    Subclasses implement `entries`, `verify` and `_collect`; `gc` chooses what goes with one
    policy (`select_garbage`) for every backend.
    """

    @abstractmethod
    def entries(self) -> list[dict]:
        """Every entry of every form, as dicts with at least ``key``, ``quantization``, ``size`` (bytes),
        ``idle_s`` (seconds since last put or get) and the ``model_fingerprint``, ``tokenizer_fingerprint``
        and ``adapter_fingerprint`` of its header (or ``damaged_header: True`` when it cannot be read)."""

    @abstractmethod
    def verify(self, quarantine: bool = False) -> list[BadEntry]:
        """Re-read every entry and check its seal, header and content address; with ``quarantine``,
        move damaged entries aside (and index valid files the index lacks). Returns what was wrong."""

    def gc(self, max_age_s: float | None = None, max_bytes: int | None = None,
           keep_model: str | None = None, keep_adapters: Sequence[str] | None = None,
           keep_tokenizer: str | None = None, dry_run: bool = False) -> dict:
        """Remove entries and leftovers.

        Args:
            max_age_s: remove entries not used for this many seconds.
            max_bytes: then remove least recently used entries until the store holds at most this.
            keep_model, keep_tokenizer, keep_adapters: when given, remove entries built by any
                other model / tokenizer / adapter (fingerprints; a kept adapter keeps its packets built
                after neighbour contexts too); entries whose header cannot be read go too.
            dry_run: only report what would go.

        Also removes the store's leftovers (stale temp files, quarantined entries).

        Returns:
            ``{"removed": n, "bytes": freed, "temp_files": n, "quarantined_files": n, "dry_run": bool}``.
        """
        doomed = select_garbage(self.entries(), max_age_s=max_age_s, max_bytes=max_bytes, keep_model=keep_model,
                                keep_adapters=keep_adapters, keep_tokenizer=keep_tokenizer)
        leftovers = self._collect(doomed, dry_run)
        return {"removed": len(doomed), "bytes": sum(e["size"] for e in doomed), **leftovers, "dry_run": dry_run}

    @abstractmethod
    def _collect(self, doomed: list[dict], dry_run: bool) -> dict:
        """Delete the ``doomed`` entries and the leftovers (unless ``dry_run``); return
        ``{"temp_files": n, "quarantined_files": n}`` (found, and removed unless dry run)."""


def _built_by(provenance: str) -> str:
    """The adapter provenance of a packet's recorded one, without the ``~`` part a packet built after its own
    neighbour contexts adds."""
    return provenance.split("~", 1)[0]


def select_garbage(entries: Iterable[dict], max_age_s: float | None = None, max_bytes: int | None = None,
                   keep_model: str | None = None, keep_adapters: Sequence[str] | None = None,
                   keep_tokenizer: str | None = None) -> list[dict]:
    """The entries `PersistentStore.gc` removes, most idle first.

    Foreign entries (another model, tokenizer or adapter than those kept, packets built after neighbour contexts
    counting as their adapter's, or an unreadable header)
    and entries idle longer than ``max_age_s`` go; then, while the rest exceed ``max_bytes``, the
    least recently used of them.
    """
    doomed, live = [], []
    for entry in sorted(entries, key=lambda e: -e["idle_s"]):
        foreign = entry.get("damaged_header") or (
            (keep_model is not None and entry["model_fingerprint"] != keep_model)
            or (keep_tokenizer is not None and entry["tokenizer_fingerprint"] != keep_tokenizer)
            or (keep_adapters is not None and _built_by(entry["adapter_fingerprint"]) not in keep_adapters
                and entry["adapter_fingerprint"] not in keep_adapters))
        if foreign or (max_age_s is not None and entry["idle_s"] > max_age_s):
            doomed.append(entry)
        else:
            live.append(entry)
    if max_bytes is not None:
        total = sum(entry["size"] for entry in live)
        for entry in live:  # most idle first
            if total <= max_bytes:
                break
            doomed.append(entry)
            total -= entry["size"]
    return doomed


def check_form(store: PacketStore, quantization: str | None) -> str:
    """The form a call means: ``quantization`` when given (validated), else the store's default."""
    return store.quantization if quantization is None else check_quantization(quantization)


class InMemoryStore(PacketStore):
    """An in-process dict of packets (the engine's default; not shared between processes).

    Holds packets as given: its only form is ``none``.

    Args:
        max_bytes: budget for the held packets' tensor bytes (`KVPacket.nbytes`); the least recently
            used packets are dropped to stay within it (a dropped packet is rebuilt when next needed).
            A packet larger than the budget is accepted but not kept. None: unbounded.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be None or >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._packets: OrderedDict[str, KVPacket] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.counters = {"puts": 0, "hits": 0, "misses": 0, "evictions": 0}

    def get(self, key: str, *, quantization: str | None = None) -> KVPacket:
        _exact_only(quantization)
        validate_key(key)
        with self._lock:
            packet = self._packets.get(key)
            self.counters["hits" if packet is not None else "misses"] += 1
            if packet is not None:
                self._packets.move_to_end(key)
        if packet is None:
            raise PacketNotFoundError(f"packet {key[:12]}… is not in the store; build it first")
        return packet

    def put(self, packet: KVPacket, *, quantization: str | None = None) -> str:
        _exact_only(quantization)
        key = packet.key
        with self._lock:
            if key in self._packets:
                self._packets.move_to_end(key)
                return key
            self.counters["puts"] += 1
            if self.max_bytes is not None and packet.nbytes > self.max_bytes:
                return key  # accepted, too large to keep
            self._packets[key] = packet
            self._bytes += packet.nbytes
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                _, dropped = self._packets.popitem(last=False)
                self._bytes -= dropped.nbytes
                self.counters["evictions"] += 1
        return key

    def contains(self, key: str, *, quantization: str | None = None) -> bool:
        _exact_only(quantization)
        return validate_key(key) in self._packets

    def delete(self, key: str, *, quantization: str | None = None) -> bool:
        _exact_only(quantization)
        with self._lock:
            packet = self._packets.pop(validate_key(key), None)
            self._bytes -= packet.nbytes if packet is not None else 0
            return packet is not None

    def keys(self, *, quantization: str | None = None) -> Iterator[str]:
        _exact_only(quantization)
        return iter(list(self._packets))

    def stats(self) -> dict:
        return {"packets": len(self._packets), "bytes": self._bytes, "max_bytes": self.max_bytes, **self.counters}


def _exact_only(quantization: str | None) -> None:
    if quantization not in (None, "none"):
        check_quantization(quantization)
        raise ValueError(f"InMemoryStore holds packets as given and has no {quantization} form; use "
                         f"LocalStore or RedisStore with quantization={quantization!r}")
