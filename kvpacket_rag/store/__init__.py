"""Packet stores: where packets live between ingestion and questions."""

from .base import InMemoryStore, PacketStore, validate_key

__all__ = ["InMemoryStore", "PacketStore", "validate_key"]
