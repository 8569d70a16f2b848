"""Exceptions raised by kvpacket-rag. Every message says what went wrong and how to fix it."""


class KVPacketError(Exception):
    """Base class of every error raised by kvpacket-rag."""


class UnsupportedModelError(KVPacketError):
    """The model's architecture or RoPE variant cannot be re-rotated exactly."""


class ContextTooLongError(KVPacketError):
    """A chunk or an assembled context exceeds what the model can attend to."""


class EmptyInputError(KVPacketError, ValueError):
    """An empty question, chunk or document was given."""


class IncompatiblePacketError(KVPacketError):
    """A packet or adapter was built for another model, tokenizer or adapter."""


class CorruptPacketError(KVPacketError):
    """A stored packet or adapter file is truncated, altered or unreadable."""


class UntrustedPacketError(CorruptPacketError):
    """A store with a signing key found a packet that is unsigned or signed with another key."""


class ModelUnavailableError(KVPacketError, OSError):
    """A model cannot be fetched or read: unknown id, no network, gated repository, damaged directory."""


class InvalidInputError(KVPacketError, ValueError):
    """An input file is not what it should be: a directory, not UTF-8 text, or malformed."""


class CorruptIndexError(KVPacketError):
    """A saved index is malformed, damaged or partially written."""


class PacketNotFoundError(KVPacketError, KeyError):
    """A packet key is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "packet not found"


class QueueFullError(KVPacketError):
    """The engine's request queue is full: too many questions are waiting for a place in the batch."""


class QueueTimeoutError(KVPacketError, TimeoutError):
    """A question waited longer than the engine's queue timeout for a place in the batch."""
