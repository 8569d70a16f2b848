"""Chat sessions: a conversation whose assembled cache is kept from one turn to the next.

A turn's prompt is ``preamble | chunks | suffix``, the suffix being the conversation so far, the new question
and the assistant header (`PromptFormatter.suffix_ids`). Answering without a session assembles the context and
forwards the whole suffix every turn, so each turn costs more than the one before. A `ChatSession` keeps the
cache of its last turn: the context plus the suffix and the answer tokens forwarded while decoding. The next
turn over the same chunks computes its full suffix ids, keeps the cached positions up to the longest common
prefix with them and forwards only the rest: the tokens closing the previous answer, the new user message and
the template tokens around it. The cached keys and values of that prefix are those a fresh assembly computes for
the same tokens at the same positions, so the turn equals a fresh assembly of the same conversation (up to float
rounding of batched against one-by-one forwards). A turn over other chunks, or with another method, reassembles.

Example:
    >>> session = engine.session()
    >>> session.answer("Who founded Quill Press?", chunks).text
    >>> session.answer("When?", chunks).forwarded_tokens    # the new message only, not the conversation
    >>> session.history                                     # the turns answered so far

Kept caches live in the engine's `SessionCache`, bounded in bytes: the least recently used ones are dropped, and
a session whose cache was dropped reassembles on its next turn.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from .context import ContextMethod, PreparedContext
from .errors import EmptyInputError
from .generation import GenerationConfig
from .kvcache import KVBuffer, PacketCache
from .prompt import ChatTurn

if TYPE_CHECKING:
    from .batchcache import BatchKV
    from .engine import Answer, AnswerStream, AsyncAnswerStream, PacketEngine
    from .scheduler import Prepare

DEFAULT_SESSION_BYTES = 1 << 30
"""Byte budget of the kept session caches of an engine (1 GiB: about 40 conversations of 500 positions of the
embedded model in float32)."""


@dataclass
class SessionState:
    """The cache a session kept after its last turn.

    Attributes:
        method: name of the method that assembled the context.
        chunks: the chunk texts of the context, in order.
        keys, values: ``[layers, kv_heads, positions, head_dim]``, the cache of ``preamble | context | ids``.
        context_length: positions of preamble and context.
        ids: the token ids cached after the context: the last turn's suffix and its forwarded answer tokens.
        packet_keys: the packets of the context, in order.
    """

    method: str
    chunks: tuple[str, ...]
    keys: torch.Tensor
    values: torch.Tensor
    context_length: int
    ids: list[int] = field(default_factory=list)
    packet_keys: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Cached positions: ``context_length + len(ids)``."""
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of its key/value cache."""
        return 2 * self.keys.numel() * self.keys.element_size()


class SessionCache:
    """The kept caches of chat sessions, least recently used dropped first beyond ``max_bytes``.

    A turn takes its session's state out (`take`) and puts it back once answered (`put`): a state in use is never
    dropped, and a second turn of the same session running at the same time reassembles instead of sharing it.
    Thread-safe.

    Args:
        max_bytes: byte budget of the kept caches (0 keeps none: every turn reassembles).
    """

    def __init__(self, max_bytes: int = DEFAULT_SESSION_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.evictions = 0
        self._states: OrderedDict[str, tuple[SessionState, int]] = OrderedDict()  # id -> (state, its bytes)
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, session_id: str) -> SessionState | None:
        """Remove and return the kept state of ``session_id`` (None when there is none)."""
        with self._lock:
            return self._pop(session_id)

    def put(self, session_id: str, state: SessionState) -> None:
        """Keep ``state`` as the most recently used, dropping the least recently used beyond the budget."""
        size = state.nbytes
        with self._lock:
            self._pop(session_id)
            self._states[session_id] = (state, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._pop(next(iter(self._states)))
                self.evictions += 1

    def drop(self, session_id: str) -> None:
        """Forget the kept state of ``session_id`` (if any)."""
        with self._lock:
            self._pop(session_id)

    def _pop(self, session_id: str) -> SessionState | None:
        state, size = self._states.pop(session_id, (None, 0))
        self._bytes -= size
        return state

    def state(self, session_id: str) -> SessionState | None:
        """The kept state of ``session_id`` without using it (None when there is none)."""
        with self._lock:
            return self._states.get(session_id, (None, 0))[0]

    def stats(self) -> dict[str, int]:
        """``sessions`` kept, their ``bytes``, ``max_bytes`` and ``evictions`` so far."""
        with self._lock:
            return {"sessions": len(self._states), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "evictions": self.evictions}


class ChatSession:
    """One conversation over retrieved chunks whose cache is kept between turns (see the module docstring).

    Create it with `PacketEngine.session`. ``history`` holds the turns answered so far; each turn's question and
    answer text are appended to it. `astream` / `aanswer` are the asyncio forms of `stream` / `answer`. Pass ``history=`` to a turn to answer after other turns instead (an
    application that keeps the conversation itself): the kept cache is reused as far as it matches.

    Attributes:
        engine: the engine that answers.
        id: the key of the kept cache in ``engine.sessions``.
        history: the conversation so far.
    """

    def __init__(self, engine: "PacketEngine", session_id: str | None = None, history: Sequence[ChatTurn] = ()):
        self.engine = engine
        self.id = session_id if session_id is not None else uuid.uuid4().hex
        self.history: list[ChatTurn] = list(history)

    def answer(self, question: str, chunks: Sequence[str], history: Sequence[ChatTurn] | None = None,
               method: str | ContextMethod | None = None, generation: GenerationConfig | None = None) -> "Answer":
        """Answer ``question`` over ``chunks``; see `stream`."""
        return self.stream(question, chunks, history, method, generation).collect()

    def stream(self, question: str, chunks: Sequence[str], history: Sequence[ChatTurn] | None = None,
               method: str | ContextMethod | None = None, generation: GenerationConfig | None = None
               ) -> "AnswerStream":
        """Stream the answer to ``question`` over ``chunks`` after the conversation, reusing the kept cache.

        Gives the answer `PacketEngine.stream` gives with the same arguments and ``history``: the same prompt
        tokens, only fewer of them forwarded. The `Answer` counts in ``context_tokens`` every position served from
        cache (history included) and in ``forwarded_tokens`` / ``question_tokens`` the tokens forwarded this turn.

        Args:
            question: the user's message (non-empty).
            chunks: retrieved chunk texts in context order (may be empty with ``method="closed_book"``).
            history: the turns before this one (default: `history`, the turns answered through this session).
            method: how the context is assembled when it is (default: the engine's `method`).
            generation: decoding settings (default: greedy, 64 tokens).

        Once the answer completes, the turn is appended to `history` and the cache kept; a stream closed early
        or failing keeps neither (the next turn reassembles).

        Raises:
            EmptyInputError, ContextTooLongError, IncompatiblePacketError (before any token is produced).
        """
        if not question or not question.strip():
            raise EmptyInputError("the question is empty; pass the text to answer")
        turns = tuple(self.history if history is None else history)
        chunks, method, generation = tuple(chunks), self.engine.method_for(method), generation or GenerationConfig()
        return self.engine._open(lambda stream: self._run(stream, question, chunks, method, turns, generation))

    def astream(self, question: str, chunks: Sequence[str], history: Sequence[ChatTurn] | None = None,
                method: str | ContextMethod | None = None, generation: GenerationConfig | None = None
                ) -> "AsyncAnswerStream":
        """`stream` for asyncio (``async for piece in session.astream(...)``); the model runs in a worker thread, so
        the event loop stays free. Errors `stream` raises before the first token come from the first ``__anext__``."""
        if not question or not question.strip():
            raise EmptyInputError("the question is empty; pass the text to answer")
        chunks = tuple(chunks)
        return self.engine._open_async(lambda: self.stream(question, chunks, history, method, generation))

    async def aanswer(self, question: str, chunks: Sequence[str], history: Sequence[ChatTurn] | None = None,
                      method: str | ContextMethod | None = None, generation: GenerationConfig | None = None
                      ) -> "Answer":
        """`answer` for asyncio, without blocking the event loop (see `astream`)."""
        return await self.astream(question, chunks, history, method, generation).collect()

    def reset(self) -> None:
        """Forget the conversation and its kept cache."""
        self.history = []
        self.engine.sessions.drop(self.id)

    def _run(self, stream: "AnswerStream", question: str, chunks: tuple[str, ...], method: ContextMethod,
             history: tuple[ChatTurn, ...], generation: GenerationConfig) -> Iterator[str]:
        engine = self.engine
        suffix = engine.formatter.suffix_ids(question, history)
        state = engine.sessions.take(self.id)
        if state is not None and (state.method, state.chunks) == (method.name, chunks):
            prepare, new = _resume(engine, state, suffix, generation)
        else:
            prepare, new = _assemble(engine, method, chunks), suffix
        kept: dict[str, torch.Tensor] = {}

        def keep(batch: "BatchKV", row: int, length: int) -> None:  # on the scheduler thread, before the row is freed
            kept["keys"] = batch.keys[:, row, :, :length].clone()
            kept["values"] = batch.values[:, row, :, :length].clone()

        yield from engine._scheduled(stream, method.name, prepare, new, generation, keep=keep)
        answer = stream.answer
        context_length = answer.context_tokens if new is suffix else state.context_length
        length = kept["keys"].shape[2]
        answered = length - answer.context_tokens - len(new)  # the last token may not be forwarded
        engine.sessions.put(self.id, SessionState(method.name, chunks, kept["keys"], kept["values"], context_length,
                                                  suffix + answer.token_ids[:answered], list(answer.packet_keys)))
        self.history = [*history, ChatTurn(question.strip(), answer.text)]


def _assemble(engine: "PacketEngine", method: ContextMethod, chunks: tuple[str, ...]) -> "Prepare":
    """Preparing a fresh context for ``chunks``."""

    def prepare(buffer: KVBuffer, reserve: int) -> PreparedContext:
        context = method.prepare(engine, chunks, buffer, reserve)
        engine.model.check_context(context.length + reserve, "context plus conversation and answer")
        return context

    return prepare


def _resume(engine: "PacketEngine", state: SessionState, suffix: list[int], generation: GenerationConfig
            ) -> tuple["Prepare", list[int]]:
    """Keep the cached positions that match ``suffix`` (at least one suffix token is left to forward): preparing
    the context they form, and the suffix tokens still to forward."""
    kept = _common_prefix(state.ids, suffix[:-1])
    length = state.context_length + kept
    new = suffix[kept:]
    engine.model.check_context(length + len(new) + generation.max_new_tokens, "context plus conversation and answer")

    def prepare(buffer: KVBuffer, reserve: int) -> PreparedContext:
        buffer.reserve(length + reserve)
        buffer.keys[:, 0, :, :length] = state.keys[:, :, :length]
        buffer.values[:, 0, :, :length] = state.values[:, :, :length]
        return PreparedContext(PacketCache(buffer, length), length, packet_keys=list(state.packet_keys))

    return prepare, new


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
