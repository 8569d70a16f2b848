"""Packet stores: where packets live between ingestion and questions.

- `InMemoryStore`: an unbounded dict in this process (the engine's default).
- `LocalStore`: a directory of checksummed, memory-mapped files with a SQLite index (the embedded default).
- `RedisStore`: one packet set shared by many processes or machines.
- `MemoryCache`: an LRU tier with a byte budget in front of any of them.

`open_store` picks one from a directory path or a ``redis://`` URL.
"""

from __future__ import annotations

import os

from .base import (SIGNING_KEY_ENV, BadEntry, InMemoryStore, PacketStore, PersistentStore, StoreError,
                   StoreUnavailableError, select_garbage, validate_key)
from .local import LocalStore
from .memory import MemoryCache

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(spec: str | os.PathLike, *, cache_bytes: int = 0, **options) -> PacketStore:
    """The store named by ``spec``: a ``redis://``/``rediss://``/``unix://`` URL or a directory path.

    Args:
        spec: Redis URL (see `RedisStore`) or store directory (see `LocalStore`).
        cache_bytes: when > 0, wrap the store in a `MemoryCache` with this byte budget.
        options: passed to the store (``quantization``, ``on_corrupt``, ``signing_key``; for a
            directory ``create``; for Redis ``prefix``, ``ttl``, ``socket_timeout``, ...).

    Example:
        >>> store = open_store("redis://localhost:6379/0", quantization="int8")
    """
    text = os.fspath(spec)
    if not text:
        raise ValueError("empty store spec: pass a directory path or a redis:// URL")
    if text.startswith(_REDIS_SCHEMES):
        from .redis_store import RedisStore  # the redis client is imported only when used

        store: PacketStore = RedisStore(text, **options)
    else:
        store = LocalStore(text, **options)
    return MemoryCache(store, cache_bytes) if cache_bytes > 0 else store


def __getattr__(name: str):
    if name == "RedisStore":
        from .redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SIGNING_KEY_ENV", "BadEntry", "InMemoryStore", "LocalStore", "MemoryCache", "PacketStore", "PersistentStore",
           "RedisStore", "StoreError", "select_garbage",
           "StoreUnavailableError", "open_store", "validate_key"]
