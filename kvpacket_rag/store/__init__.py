"""Packet stores: where packets live between ingestion and questions.

- `InMemoryStore`: a dict in this process, optionally with a byte budget (the engine's default, bounded).
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
        store: PacketStore = _redis_store_class()(text, **options)
    else:
        store = LocalStore(text, **options)
    return MemoryCache(store, cache_bytes) if cache_bytes > 0 else store


def _redis_store_class() -> type:
    """`RedisStore`, importing the redis client only when a Redis store is used."""
    try:
        from .redis_store import RedisStore
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "redis":
            raise
        raise ModuleNotFoundError("the Redis packet store needs the redis client: pip install 'kvpacket-rag[redis]'",
                                  name="redis") from error
    return RedisStore


def __getattr__(name: str):
    if name == "RedisStore":
        return _redis_store_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SIGNING_KEY_ENV", "BadEntry", "InMemoryStore", "LocalStore", "MemoryCache", "PacketStore", "PersistentStore",
           "RedisStore", "StoreError", "select_garbage",
           "StoreUnavailableError", "open_store", "validate_key"]
