"""Answering over retrieved chunks through their packets: the one module the framework integrations use.

`stream_answer` is the single answering path of `kvpacket_rag.index.PacketIndex`, the LangChain and the
LlamaIndex integrations: the same question, chunks, history and generation settings give the same answer
everywhere. `ensure_packets` checks the packet keys recorded on retrieved chunks at ingestion (metadata
``PACKET_KEY``) and builds missing packets. `RAGAnswer` carries the answer, its sources, timings, token usage
(cache reads and creations) and packet hits.

Plain chat without documents is `kvpacket_rag.engine.PacketEngine.chat`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

from .errors import EmptyInputError, IncompatiblePacketError, KVPacketError, PacketNotFoundError
from .generation import GenerationConfig
from .prompt import ChatTurn

if TYPE_CHECKING:
    from .context import ContextMethod
    from .engine import Answer, PacketEngine
    from .index import SearchHit
    from .session import ChatSession

PACKET_KEY = "packet_key"
"""Metadata field holding a chunk's packet key (documents, nodes, chunk records)."""

MissingPackets = Literal["build", "error"]


class MissingPacketKeyError(KVPacketError, KeyError):
    """A retrieved chunk carries no packet key and building on demand is off."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "missing packet key"


@dataclass
class RAGAnswer:
    """An answer with the chunks it was given.

    Attributes:
        text: the answer text.
        sources: the retrieved chunks in context order (empty when closed-book).
        closed_book: True when nothing was retrieved and the model answered without documents.
        answer: the engine's `Answer` (method, token ids, FLOPs, packet keys).
        timings: the engine's timings plus ``retrieval_s``; ``ttft_s`` and ``total_s`` here run from the start of
            the call (retrieval included), ``engine_ttft_s`` from the engine call.
        packets_built, tokens_built: packets (and their chunk tokens) built for this call, before or during it.
    """

    text: str
    sources: list["SearchHit"]
    closed_book: bool
    answer: "Answer"
    timings: dict[str, float]
    packets_built: int = 0
    tokens_built: int = 0

    @property
    def packet_keys(self) -> list[str]:
        return list(self.answer.packet_keys)

    @property
    def packets_hit(self) -> int:
        """Packets of this answer that were read from the store (not built for it)."""
        return len(self.answer.packet_keys) - self.packets_built

    def usage(self) -> dict[str, int]:
        """Token counts: ``input_tokens`` (context positions plus the question suffix), ``output_tokens``,
        ``total_tokens``, ``cache_read_tokens`` (context positions served from cached KV: preamble and packets,
        not forwarded at question time) and ``cache_creation_tokens`` (chunk tokens of packets built for this call).
        """
        answer = self.answer
        forwarded_context = answer.forwarded_tokens - answer.question_tokens
        inputs = answer.context_tokens + answer.question_tokens
        return {"input_tokens": inputs, "output_tokens": len(answer.token_ids),
                "total_tokens": inputs + len(answer.token_ids),
                "cache_read_tokens": max(0, answer.context_tokens - forwarded_context),
                "cache_creation_tokens": self.tokens_built}

    def metadata(self) -> dict:
        """JSON-friendly summary for framework response metadata."""
        return {"closed_book": self.closed_book, "method": self.answer.method, "packet_keys": self.packet_keys,
                "packets_hit": self.packets_hit, "packets_built": self.packets_built,
                "ttft_s": self.timings["ttft_s"], "finish_reason": self.answer.finish_reason,
                "timings": dict(self.timings), "context_tokens": self.answer.context_tokens,
                "forwarded_tokens": self.answer.forwarded_tokens}


class RAGAnswerStream:
    """Iterate for the answer text piece by piece; ``result`` holds the `RAGAnswer` once iteration ends.

    ``sources`` and ``closed_book`` are known before the first piece.
    """

    def __init__(self, stream, sources: list["SearchHit"], closed_book: bool, started: float, retrieval_s: float,
                 prebuilt: tuple[int, int] = (0, 0)):
        self.sources = sources
        self._prebuilt = prebuilt
        self.closed_book = closed_book
        self.result: RAGAnswer | None = None
        self._stream = stream
        self._started = started
        self._retrieval_s = retrieval_s
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def _run(self) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self._stream:
                pieces.append(piece)
                yield piece
        finally:
            self._stream.close()  # stopped early: the engine's buffer goes back now
        answer = self._stream.answer
        timings = dict(answer.timings)
        offset = answer.timings["total_s"]
        elapsed = time.perf_counter() - self._started
        timings.update(engine_ttft_s=answer.timings["ttft_s"], retrieval_s=self._retrieval_s,
                       ttft_s=answer.timings["ttft_s"] + (elapsed - offset), total_s=elapsed)
        built, tokens = self._prebuilt
        self.result = RAGAnswer("".join(pieces), self.sources, self.closed_book, answer, timings,
                                built + answer.packets_built, tokens + answer.tokens_built)

    def collect(self) -> RAGAnswer:
        """Consume the stream and return the `RAGAnswer`."""
        for _ in self._pieces:
            pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        """Stop the generation early and return the engine's buffer (no `result` is set)."""
        self._pieces.close()


def ensure_packets(engine: "PacketEngine", texts: Sequence[str], recorded_keys: Sequence[str | None] | None = None,
                   missing: MissingPackets = "build") -> list[str]:
    """Check retrieved chunks against their recorded packet keys and make sure their packets are stored.

    Args:
        engine: the engine that will answer.
        texts: chunk texts in context order.
        recorded_keys: the key recorded for each chunk at ingestion (None where none was recorded).
        missing: ``build`` builds absent packets (and keys) on demand; ``error`` raises instead.

    Returns:
        the packet keys, in order of ``texts``.

    Raises:
        IncompatiblePacketError: a recorded key is not this chunk's key under ``engine`` (stale metadata from
            another model/adapter, or edited text).
        MissingPacketKeyError: a chunk has no recorded key and ``missing == "error"``.
        PacketNotFoundError: a packet is not in the store and ``missing == "error"``.
    """
    return _ensure(engine, texts, recorded_keys, missing)[0]


def _ensure(engine: "PacketEngine", texts: Sequence[str], recorded_keys: Sequence[str | None] | None,
            missing: MissingPackets, method: "ContextMethod | None" = None) -> tuple[list[str], tuple[int, int]]:
    """`ensure_packets`, also returning ``(packets built, their chunk tokens)``; with ``method``, the packets it
    reads are made sure of too (`ContextMethod.reads`: each chunk's for its place, the first chunk's exact one)."""
    if missing not in ("build", "error"):
        raise ValueError(f"missing must be 'build' or 'error', got {missing!r}")
    recorded = list(recorded_keys) if recorded_keys is not None else [None] * len(texts)
    if len(recorded) != len(texts):
        raise ValueError("recorded_keys must have one entry per text")
    reads = [(list(texts), "adapted", None), *(method.reads(texts) if method is not None else ())]
    read_keys = [engine.packet_keys_for(group, kind, place) for group, kind, place in reads]
    keys = read_keys[0]  # the chunks' recorded (place-independent) packets
    for n, (key, actual) in enumerate(zip(recorded, keys)):
        if key is None and missing == "error":
            raise MissingPacketKeyError(
                f"retrieved chunk {n} has no packet key; run the packet ingestion step over the corpus "
                "(or allow building on demand with missing='build')")
        if key is not None and key != actual:
            raise IncompatiblePacketError(
                f"retrieved chunk {n} records packet {key[:12]}… but under this model/adapter its packet is "
                f"{actual[:12]}…; the corpus was ingested with another model or adapter (or the text was edited): "
                "re-run the packet ingestion step with this engine")
    needed = list(dict.fromkeys(key for group_keys in read_keys for key in group_keys))
    absent = [key for key in needed if not engine.store.contains(key)]
    if not absent:
        return keys, (0, 0)
    if missing == "error":
        raise PacketNotFoundError(
            f"{len(absent)} of the {len(needed)} packets these retrieved chunks need are not in the store (first: "
            f"{absent[0][:12]}…); ingest the corpus with this engine (it builds the packets its method reads, e.g. "
            "engine.ingest_packets(texts)) or allow building on demand with missing='build'")
    built = [engine.packets_for(group, kind, place) for (group, kind, place), group_keys in zip(reads, read_keys)
             if not all(engine.store.contains(key) for key in group_keys)]  # a group built by an earlier one is skipped
    return keys, (sum(fetch.built for fetch in built), sum(fetch.built_tokens for fetch in built))


PACKET_READINGS = ("kv_packet_first_exact", "kv_packet")
"""The methods that read the chunks' adapter packets (the ones an index records keys for); neither forwards a chunk."""


def stream_answer(engine: "PacketEngine", question: str, texts: Sequence[str], *,
                  recorded_keys: Sequence[str | None] | None = None, missing: MissingPackets = "build",
                  history: Sequence[ChatTurn] = (), generation: GenerationConfig | None = None,
                  method: str | None = None, sources: Sequence[SearchHit] | None = None,
                  started: float | None = None, retrieval_s: float = 0.0,
                  session: ChatSession | str | None = None) -> RAGAnswerStream:
    """Stream the answer to ``question`` over retrieved chunk ``texts`` (context order) through their packets.

    With no texts the question is answered closed-book (``closed_book`` is True). ``method`` defaults to the
    engine's. Packets are checked with `ensure_packets` first (and the first chunk's exact packet, for a method
    that reads it). Every integration answers through this function, so the same question, chunks,
    history and generation settings give the same answer everywhere.

    With ``session`` (a `kvpacket_rag.session.ChatSession` or a session id of ``engine``) the turn goes through
    the session's kept cache: the same answer, forwarding only what is new since its last turn (``history`` is
    still the whole conversation before ``question``).

    Raises:
        EmptyInputError, IncompatiblePacketError, MissingPacketKeyError, PacketNotFoundError (before any token).
    """
    started = time.perf_counter() if started is None else started
    if not question or not question.strip():
        raise EmptyInputError("the question is empty; pass the text to answer")
    texts = list(texts)
    closed_book = not texts
    prebuilt = (0, 0)
    method = engine.method_for("closed_book" if closed_book else method)
    if "adapted" in method.packet_kinds:
        prebuilt = _ensure(engine, texts, recorded_keys, missing, method)[1]
    if session is None:
        stream = engine.stream(question, texts, method=method, history=tuple(history), generation=generation)
    else:
        session = engine.session(session) if isinstance(session, str) else session
        stream = session.stream(question, texts, history=tuple(history), method=method, generation=generation)
    return RAGAnswerStream(stream, list(sources or []), closed_book, started, retrieval_s, prebuilt)


def split_turns(messages: Sequence[tuple[str, str]]) -> tuple[str, list[ChatTurn]]:
    """``(question, earlier turns)`` of ``(role, text)`` messages, for answering through packets.

    The trailing user message(s) are the question (consecutive ones joined by newlines); each assistant message
    closes a turn with the user messages before it. System messages are left out, with a warning: on the packet
    path the system prompt is the engine's cached preamble (set it with ``PacketEngine(system_prompt=...)``).

    Raises:
        ValueError: a role other than ``system``, ``user`` and ``assistant``, or no trailing user message.
    """
    turns: list[ChatTurn] = []
    pending: list[str] = []
    for role, text in messages:
        if role == "system":
            warnings.warn("a system message is ignored when answering through packets: the system prompt is part of "
                          "the cached preamble; set it once with PacketEngine(system_prompt=...)", UserWarning,
                          stacklevel=3)
        elif role == "user":
            pending.append(text)
        elif role == "assistant":
            turns.append(ChatTurn("\n".join(pending), text))
            pending = []
        else:
            raise ValueError(f"{role} messages are not supported (no tool calling); pass system, user and assistant "
                             "messages only")
    if not pending:
        raise ValueError("the conversation must end with a user message (the question to answer)")
    return "\n".join(pending), turns


PASTED_CONTEXT_MARKERS = ("context information is below", "use the following pieces of retrieved context",
                          "answer the question based only on the following context", "---------------------")
"""Phrases of the stock RAG prompt templates of LangChain and LlamaIndex that paste documents into the prompt."""

PASTED_CONTEXT_TOKENS = 1024
"""A plain prompt at least this long probably carries pasted documents."""


def looks_like_pasted_documents(prompt: str, n_tokens: int) -> bool:
    """True when a plain prompt seems to hold retrieved documents (a stock RAG template, or a very long prompt):
    they run through the model in full, with no packets and no speedup."""
    lowered = prompt.lower()
    return n_tokens >= PASTED_CONTEXT_TOKENS or any(marker in lowered for marker in PASTED_CONTEXT_MARKERS)
