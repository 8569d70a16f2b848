"""kvpacket-rag: recomputation-free, context-independent KV caching for RAG (KV packets)."""

from .adapter import PacketAdapter
from .builder import PacketBuilder
from .engine import Answer, AnswerStream, PacketEngine
from .errors import (ContextTooLongError, CorruptPacketError, EmptyInputError, IncompatiblePacketError,
                     KVPacketError, PacketNotFoundError, UnsupportedModelError)
from .generation import GenerationConfig
from .models import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .packet import KVPacket, packet_key
from .prompt import ChatTurn, PromptFormatter

__version__ = "0.1.0"
__all__ = [
    "Answer", "AnswerStream", "ChatTurn", "ContextTooLongError", "CorruptPacketError", "DEFAULT_MODEL",
    "EmptyInputError", "GenerationConfig", "IncompatiblePacketError", "KVPacket", "KVPacketError", "LoadedModel",
    "PacketAdapter", "PacketBuilder", "PacketEngine", "PacketNotFoundError", "PromptFormatter",
    "UnsupportedModelError", "load_model", "packet_key", "wrap_model",
]
