"""The packet store interface: content-addressed, immutable packets."""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Sequence

from ..errors import KVPacketError, PacketNotFoundError
from ..packet import KVPacket

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

    Invariants every implementation keeps:
      - ``put(p)`` stores ``p`` under ``p.key``; a key always maps to the same bytes, so putting
        an existing key is a no-op.
      - ``get`` returns a packet equal to the one put, or raises `PacketNotFoundError` /
        `CorruptPacketError`; it never returns a partial or altered packet.
      - Keys are validated with `validate_key` before any I/O.
    """

    @abstractmethod
    def get(self, key: str) -> KVPacket:
        """The packet stored under ``key``."""

    def get_many(self, keys: Sequence[str]) -> list[KVPacket | None]:
        """Packets for ``keys`` in order, None where a key is missing."""
        out: list[KVPacket | None] = []
        for key in keys:
            try:
                out.append(self.get(key))
            except PacketNotFoundError:
                out.append(None)
        return out

    @abstractmethod
    def put(self, packet: KVPacket) -> str:
        """Store ``packet``; return its key."""

    def put_many(self, packets: Iterable[KVPacket]) -> list[str]:
        return [self.put(packet) for packet in packets]

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Whether ``key`` is stored."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """All stored keys."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters and sizes (at least ``packets`` and ``bytes``)."""

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def __iter__(self) -> Iterator[str]:
        return self.keys()


class InMemoryStore(PacketStore):
    """An unbounded in-process dict of packets (the engine's default; not shared between processes)."""

    def __init__(self) -> None:
        self._packets: dict[str, KVPacket] = {}
        self._lock = threading.Lock()
        self.counters = {"puts": 0, "hits": 0, "misses": 0}

    def get(self, key: str) -> KVPacket:
        validate_key(key)
        with self._lock:
            packet = self._packets.get(key)
            self.counters["hits" if packet is not None else "misses"] += 1
        if packet is None:
            raise PacketNotFoundError(f"packet {key[:12]}… is not in the store; build it first")
        return packet

    def put(self, packet: KVPacket) -> str:
        key = packet.key
        with self._lock:
            if key not in self._packets:
                self._packets[key] = packet
                self.counters["puts"] += 1
        return key

    def contains(self, key: str) -> bool:
        return validate_key(key) in self._packets

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._packets.pop(validate_key(key), None) is not None

    def keys(self) -> Iterator[str]:
        return iter(list(self._packets))

    def stats(self) -> dict:
        return {"packets": len(self._packets), "bytes": sum(p.nbytes for p in self._packets.values()), **self.counters}
