"""kvpacket-rag: recomputation-free, context-independent KV caching for RAG (KV packets).

Example:
    >>> from kvpacket_rag import Document, PacketEngine, PacketIndex, open_store
    >>> engine = PacketEngine(store=open_store("packets/"))
    >>> index = PacketIndex(engine)
    >>> index.add_documents([Document("Quill Press was founded in 1988 by Fiona Baird.", doc_id="quill")])
    >>> index.answer("Who founded Quill Press?").text
"""

from .adapter import SHIPPED_ADAPTERS, PacketAdapter, resolve_adapter
from .builder import PacketBuilder
from .calibration import CalibrationConfig, NeighbourContexts, calibrate
from .chunker import Chunker, ChunkerConfig
from .context import ContextMethod, ContextSource, PreparedContext
from .embedder import Embedder
from .engine import Answer, AnswerStream, AsyncAnswerStream, PacketEngine
from .errors import (ContextTooLongError, CorruptPacketError, EmptyInputError, IncompatiblePacketError,
                     KVPacketError, PacketNotFoundError, QueueFullError, QueueTimeoutError, UnsupportedModelError)
from .generation import GenerationConfig
from .index import ChunkRecord, Document, IngestReport, PacketIndex, SearchHit
from .methods import METHODS, get_method
from .models import DEFAULT_MODEL, LoadedModel, load_model, wrap_model
from .packet import KVPacket, packet_key
from .prompt import ChatTurn, PromptFormatter
from .rag import PACKET_KEY, RAGAnswer, RAGAnswerStream, ensure_packets, stream_answer
from .scheduler import SchedulerConfig
from .session import ChatSession, SessionCache
from .settings import EngineSettings, shared_engine
from .store import InMemoryStore, LocalStore, PacketStore, StoreError, open_store

__version__ = "0.1.0"
__all__ = [
    "Answer", "AnswerStream", "AsyncAnswerStream", "CalibrationConfig", "ChatSession", "ChatTurn", "Chunker", "ChunkerConfig", "ChunkRecord",
    "ContextMethod", "ContextSource",
    "ContextTooLongError", "CorruptPacketError", "DEFAULT_MODEL", "Document", "Embedder", "EmptyInputError",
    "EngineSettings", "GenerationConfig", "IncompatiblePacketError", "IngestReport", "InMemoryStore", "KVPacket",
    "KVPacketError", "LoadedModel", "LocalStore", "METHODS", "NeighbourContexts", "PACKET_KEY", "PacketAdapter",
    "PacketBuilder",
    "PacketEngine", "PacketIndex", "PacketNotFoundError", "PacketStore", "PreparedContext", "PromptFormatter",
    "QueueFullError", "QueueTimeoutError", "RAGAnswer", "RAGAnswerStream", "SHIPPED_ADAPTERS", "SchedulerConfig",
    "SearchHit", "SessionCache", "StoreError", "UnsupportedModelError",
    "calibrate", "ensure_packets", "get_method", "load_model", "open_store", "packet_key", "resolve_adapter", "shared_engine",
    "stream_answer", "wrap_model",
]
