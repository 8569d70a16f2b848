"""The question-time engine: packets in, answer out, with timings and FLOPs.

Example:
    >>> engine = PacketEngine()                      # default model and adapter
    >>> answer = engine.answer("Where was Ada born?", ["Ada was born in London.", "Bob likes tea."])
    >>> answer.text, answer.timings["ttft_s"]
    >>> for piece in engine.stream("Where was Ada born?", chunks):
    ...     print(piece, end="")
    >>> answer = await engine.aanswer("Where was Ada born?", chunks)   # in a coroutine
    >>> async for piece in engine.astream("Where was Ada born?", chunks):
    ...     print(piece, end="")
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from .adapter import PREFIX_PREAMBLE, PacketAdapter, resolve_adapter
from .aio import iterate_in_thread
from .builder import PacketBuilder
from .calibration import NeighbourContexts
from .context import ContextMethod, PacketFetch, PacketKind, PreparedContext
from .errors import EmptyInputError
from .flops import forward_flops
from .generation import GenerationConfig, eos_ids
from .kvcache import KVBuffer, PacketCache
from .methods import DEFAULT_METHOD, get_method
from .models import LoadedModel, load_model
from .prompt import DEFAULT_SYSTEM_PROMPT, ChatTurn, PromptFormatter
from .scheduler import Keep, Prepare, Request, Scheduler, SchedulerConfig
from .session import DEFAULT_SESSION_BYTES, ChatSession, SessionCache
from .store import InMemoryStore, PacketStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_STORE_BYTES = 4 << 30
"""Byte budget of the default in-process packet store (4 GiB: about 180 packets of 512 tokens of the
embedded model in float32)."""


@dataclass
class Answer:
    """One generated answer and how it was produced.

    Attributes:
        text: the answer (stop strings and special tokens removed).
        token_ids: generated token ids.
        method: the method name (``kv_packet``, ``full_recompute``, ...).
        timings: seconds: ``queue_s`` (waiting for a place in the batch), ``packet_load_s``, ``packet_build_s``,
            ``assembly_s``, ``context_prefill_s``, ``question_prefill_s`` (the forward that prefilled this question,
            together with the questions that joined the batch with it and the context tokens a method recomputes
            in that forward), ``ttft_s`` (call start to first token) and
            ``total_s``.
        context_flops: FLOPs spent on the documents at question time (rotation and/or recompute).
        prefill_flops: all FLOPs before the first token (context work plus the question prefill).
        context_tokens: positions of preamble and context; question_tokens: suffix length.
        forwarded_tokens: tokens pushed through the model before the first token (question included).
        packet_keys: packets used, in context order.
        packets_built: how many of them were built during the call (the others came from the store).
        tokens_built: chunk tokens of the packets built during the call.
        finish_reason: ``stop`` (end of sequence or a stop string) or ``length`` (``max_new_tokens`` reached).
    """

    text: str
    token_ids: list[int]
    method: str
    timings: dict[str, float]
    context_flops: int
    prefill_flops: int
    context_tokens: int
    question_tokens: int
    forwarded_tokens: int
    packet_keys: list[str] = field(default_factory=list)
    packets_built: int = 0
    tokens_built: int = 0
    finish_reason: str = "stop"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class AnswerStream:
    """Iterate to receive the answer text piece by piece; `answer` is set once iteration ends."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def collect(self) -> Answer:
        """Consume the stream and return the final `Answer`."""
        for _ in self._pieces:
            pass
        assert self.answer is not None
        return self.answer

    def close(self) -> None:
        """Stop the generation early and free its place in the batch (no `answer` is set)."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


class AsyncAnswerStream:
    """Iterate with ``async for`` to receive the answer text piece by piece; `answer` is set once iteration ends.

    The model runs in a worker thread, so the event loop keeps serving other coroutines. Stopping early
    (``break``, ``aclose()`` or cancelling the task) stops the generation and frees its place in the batch.
    """

    def __init__(self, open_stream: Callable[[], AnswerStream]):
        self._open = open_stream
        self.answer: Answer | None = None
        self._pieces = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def aclose(self) -> None:
        """Stop the generation (if still running) and free its place in the batch."""
        await self._pieces.aclose()

    async def _run(self) -> AsyncIterator[str]:
        opened: list[AnswerStream] = []

        def start() -> AnswerStream:
            opened.append(self._open())
            return opened[0]

        async with aclosing(iterate_in_thread(start)) as pieces:
            async for piece in pieces:
                yield piece
        self.answer = opened[0].answer

    async def collect(self) -> Answer:
        """Consume the stream and return the final `Answer`."""
        async for _ in self._pieces:
            pass
        assert self.answer is not None
        return self.answer


class PacketEngine:
    """Answers questions over chunks through KV packets (or a baseline method).

    Args:
        model: a `LoadedModel`, a Hugging Face id/directory, or None for the embedded default.
        adapter: see `resolve_adapter` (default: the shipped adapter of the default model).
        store: where packets are read and written (default: an in-process `InMemoryStore` of at most
            `DEFAULT_STORE_BYTES`, least recently used packets dropped and rebuilt when needed again).
        system_prompt: system message of the cached preamble.
        device, dtype: where and how to load ``model`` when it is not already loaded.
        scheduler: batch and queue limits of the request scheduler (default `SchedulerConfig()`).
        session_bytes: byte budget of the caches kept by chat sessions (`session`); least recently used first
            dropped beyond it.
        method: how answers read the chunks when no method is named (default `DEFAULT_METHOD`,
            ``kv_packet_first_exact``: the first chunk from its exact packet, the others from adapter packets;
            ``kv_packet`` reads every chunk from its adapter packet and stores one packet per chunk instead of two).

    Thread-safe: one engine may serve several threads and coroutines at once. Every answer (`answer`, `stream`,
    `chat`, chat session turns and their async forms) goes through the engine's `Scheduler`: one decode loop whose
    every forward prefills the questions joining it and advances all other active answers by one token, each
    with its own context, positions, stop strings and token budget, so every answer equals the answer alone.
    Model work outside answers (packet builds) shares one engine lock with the loop's steps.
    """

    def __init__(self, model: LoadedModel | str | None = None, adapter: PacketAdapter | str | Path | None = "default",
                 store: PacketStore | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                 scheduler: SchedulerConfig | None = None, session_bytes: int = DEFAULT_SESSION_BYTES,
                 method: str | ContextMethod = DEFAULT_METHOD):
        self.method = get_method(method)
        self.model = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        self.adapter = resolve_adapter(self.model, adapter)
        self.store = store if store is not None else InMemoryStore(max_bytes=DEFAULT_STORE_BYTES)
        self.formatter = PromptFormatter(self.model.tokenizer, system_prompt)
        self.builder = PacketBuilder(self.model, self.adapter, self.formatter)
        self.bare_builder = PacketBuilder(self.model, None, self.formatter)
        self.exact_builder = PacketBuilder(self.model, PacketAdapter.empty(self.model, PREFIX_PREAMBLE), self.formatter)
        self._builders: dict[str, PacketBuilder] = {}
        self._place_builders: list[PacketBuilder] = []  # by-place calibration: adapted packets of places 0..depth-1
        self.counters = {"packets_built": 0, "packets_loaded": 0}
        self._preamble: tuple[torch.Tensor, torch.Tensor] | None = None
        self._compute = threading.RLock()  # model work: one step at a time
        self._stop_ids = eos_ids(self.model.tokenizer, self.model.config)
        self.scheduler = Scheduler(self.model, self._compute, scheduler or SchedulerConfig(), self._stop_ids)
        self.sessions = SessionCache(session_bytes)

    # ---- packets -------------------------------------------------------------------------

    def chunk_ids(self, text: str) -> list[int]:
        """Token ids of one chunk (validated for emptiness and length)."""
        return self.builder.chunk_ids(text)

    def build_packets(self, chunks: Sequence[str], kind: PacketKind = "adapted", progress: bool = False) -> list[str]:
        """Make sure every chunk has a stored packet of ``kind``; return their keys (builds only the missing ones).

        ``kind``: ``adapted`` (this engine's adapter, the default), ``bare`` (no adapter), ``exact`` (no adapter,
        built after the chat preamble: exact as a context's first chunk) or a `PacketAdapter`.
        """
        return self._fetch(chunks, self.builder_for(kind), progress).keys

    def calibrate_on(self, neighbours: NeighbourContexts | None) -> None:
        """Build this engine's adapter packets after each chunk's own neighbour contexts from now on (None: as
        the adapter builds them). Their keys record each chunk's own contexts, so packets built otherwise are not
        read in their place; exact and bare packets are unchanged.

        With ``neighbours.config.by_place``, a chunk read at place p (p chunks before it) reads the adapter packet
        built after the last min(p, depth) passages of its contexts, at place 0 the one built after none; ingestion
        builds one per place.

        Raises:
            ValueError: the adapter carries calibration contexts of its own.
        """
        with self._compute:
            self.builder = PacketBuilder(self.model, self.adapter, self.formatter, neighbours=neighbours)
            self._place_builders = []
            if neighbours is not None and neighbours.config.by_place:
                self._place_builders = [PacketBuilder(self.model, self.adapter, self.formatter)] + [
                    PacketBuilder(self.model, self.adapter, self.formatter, neighbours=neighbours.at_depth(depth))
                    for depth in range(1, neighbours.config.depth)]

    @property
    def ingest_kinds(self) -> list[PacketKind]:
        """The packet kinds `ingest_packets` builds: those the engine's `method` reads, and ``adapted``."""
        return [*(kind for kind in self.method.packet_kinds if kind != "adapted"), "adapted"]

    @property
    def ingest_builders(self) -> list[PacketBuilder]:
        """The builders of every packet `ingest_packets` builds for a chunk: one per kind of `ingest_kinds`, with
        by-place calibration one per place the `method` reads (the first chunk's place too unless it reads that
        chunk's exact packet), the ``adapted`` one (the deepest place) last."""
        first = 1 if "exact" in self.method.packet_kinds else 0
        return ([self.builder_for(kind) for kind in self.ingest_kinds[:-1]] + self._place_builders[first:]
                + [self.builder])

    def ingest_packets(self, chunks: Sequence[str], progress: bool = False) -> list[str]:
        """Build (only the missing) packets of ``chunks`` of every builder in `ingest_builders` (any chunk may be
        retrieved first, so with ``kv_packet_first_exact`` every chunk gets its exact packet too); return the
        adapted packets' keys, in order (the keys an index records)."""
        for builder in self.ingest_builders[:-1]:
            self._fetch(chunks, builder, progress)
        return self.build_packets(chunks, progress=progress)

    def packets_for(self, chunks: Sequence[str], kind: PacketKind = "adapted",
                    first_place: int | None = None) -> PacketFetch:
        """Packets of ``chunks`` of ``kind`` from the store, building and storing missing ones (see `build_packets`).

        ``first_place``: the place of ``chunks[0]`` among the context's chunks (the others follow in order); with
        by-place calibration (`calibrate_on`) it chooses each chunk's adapted packet. None: the place-independent
        packets (the deepest place's under by-place calibration).
        """
        return self._fetch(chunks, self._readers(chunks, kind, first_place), progress=False)

    def packet_keys_for(self, chunks: Sequence[str], kind: PacketKind = "adapted",
                        first_place: int | None = None) -> list[str]:
        """The store keys `packets_for` reads for the same arguments, in order (nothing is read or built)."""
        return [b.key_for(b.chunk_ids(chunk)) for b, chunk in zip(self._readers(chunks, kind, first_place), chunks)]

    def _readers(self, chunks: Sequence[str], kind: PacketKind, first_place: int | None) -> list[PacketBuilder]:
        """The builder of each chunk's packet as `packets_for` reads it."""
        if first_place is None or kind != "adapted" or not self._place_builders:
            return [self.builder_for(kind)] * len(chunks)
        places = self._place_builders
        return [places[place] if place < len(places) else self.builder
                for place in range(first_place, first_place + len(chunks))]

    def packet_key(self, text: str, kind: PacketKind = "adapted") -> str:
        """The key the packet of chunk ``text`` has (or will have) in the store."""
        builder = self.builder_for(kind)
        return builder.key_for(builder.chunk_ids(text))

    def builder_for(self, kind: PacketKind) -> PacketBuilder:
        """The builder of packets of ``kind`` (see `build_packets`)."""
        if kind == "adapted":
            return self.builder
        if kind == "bare":
            return self.bare_builder
        if kind == "exact":
            return self.exact_builder
        if not isinstance(kind, PacketAdapter):
            raise ValueError(f"packet kind must be 'adapted', 'bare', 'exact' or a PacketAdapter, got {kind!r}")
        with self._compute:
            if kind.fingerprint not in self._builders:
                kind.check_model(self.model)
                self._builders[kind.fingerprint] = PacketBuilder(self.model, kind, self.formatter)
            return self._builders[kind.fingerprint]

    def _fetch(self, chunks, builder: PacketBuilder | Sequence[PacketBuilder], progress) -> PacketFetch:
        """Packets of ``chunks`` (each of its own builder when ``builder`` is a list), read in one store call."""
        builders = [builder] * len(chunks) if isinstance(builder, PacketBuilder) else list(builder)
        with self._compute:  # builds run the model; counters change
            ids = [b.chunk_ids(chunk) for b, chunk in zip(builders, chunks)]
            keys = [b.key_for(i) for b, i in zip(builders, ids)]
            found = self.store.get_many(keys)
            missing = [n for n, packet in enumerate(found) if packet is None]
            first_of = {}
            for n in missing:  # a chunk repeated in one call is built once
                first_of.setdefault(keys[n], n)
            unique = list(first_of.values())
            start = time.perf_counter()
            unsaved = None
            for each in dict.fromkeys(builders[n] for n in unique):
                rows = [n for n in unique if builders[n] is each]
                for n, packet in zip(rows, each.build_many([ids[n] for n in rows], progress=progress)):
                    try:
                        self.store.put(packet)
                    except StoreError as error:  # disk full, read-only, server refused: the packet is in hand
                        unsaved = unsaved or error
                    found[n] = packet
            for n in missing:
                found[n] = found[first_of[keys[n]]]
            if unsaved is not None:
                log.warning("could not store %d new packets (%s); answering with them anyway", len(unique), unsaved)
            self.counters["packets_built"] += len(unique)
            build_s = time.perf_counter() - start if missing else 0.0
            for packet, b, chunk_ids in zip(found, builders, ids):
                packet.check_compatible(self.model.fingerprint, self.model.tokenizer_fingerprint,
                                        b.provenance_for(chunk_ids))
            self.counters["packets_loaded"] += len(found) - len(missing)
            return PacketFetch(found, keys, build_s, [keys[n] for n in unique], sum(len(ids[n]) for n in unique))

    def method_for(self, method: str | ContextMethod | None) -> ContextMethod:
        """The method named by ``method`` (a name or an object), or the engine's `method` for None."""
        return self.method if method is None else get_method(method)

    def preamble_ids(self) -> list[int]:
        """Token ids of the cached chat preamble."""
        return self.formatter.preamble_ids()

    def preamble_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[layers, kv_heads, P, head_dim]`` of the chat preamble, computed once."""
        with self._compute:
            if self._preamble is None:
                ids = self.preamble_ids()
                cache = PacketCache(KVBuffer(self.model, len(ids)), 0)
                self.forward_context(ids, cache)
                self._preamble = cache.to_block()
            return self._preamble

    @torch.no_grad()
    def forward_context(self, ids: Sequence[int], cache) -> None:
        """Run context tokens through the base model (no LM head), appending to ``cache``."""
        start = cache.get_seq_length()
        input_ids = torch.tensor([list(ids)], device=self.model.device)
        positions = torch.arange(start, start + len(ids), device=self.model.device).unsqueeze(0)
        self.model.model.model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True)

    # ---- answering -----------------------------------------------------------------------

    def answer(self, question: str, chunks: Sequence[str], method: str | ContextMethod | None = None,
               history: Sequence[ChatTurn] = (), generation: GenerationConfig | None = None) -> Answer:
        """Answer ``question`` over ``chunks`` (in context order). See `stream` for the arguments."""
        return self.stream(question, chunks, method, history, generation).collect()

    def stream(self, question: str, chunks: Sequence[str], method: str | ContextMethod | None = None,
               history: Sequence[ChatTurn] = (), generation: GenerationConfig | None = None) -> AnswerStream:
        """Stream the answer to ``question`` over ``chunks``.

        Args:
            question: the user's question (non-empty).
            chunks: retrieved chunk texts, in the order they appear in the context (may be empty).
            method: ``kv_packet_first_exact``, ``kv_packet``, ``no_recompute``, ``full_recompute``, ``closed_book``,
                ... or an object (default: the engine's `method`).
            history: earlier turns of the conversation; they follow the packets in the prompt.
            generation: decoding settings (default: greedy, 64 tokens).

        The question waits for a place in the engine's batch (see `SchedulerConfig`), then is decoded together with
        the other questions in progress; iterating the stream starts it, closing it frees its place.

        Raises:
            EmptyInputError (at once); QueueFullError, QueueTimeoutError, ContextTooLongError,
            IncompatiblePacketError (from the first iteration, before any token is produced).
        """
        if not question or not question.strip():
            raise EmptyInputError("the question is empty; pass the text to answer")
        chunks, method, history = list(chunks), self.method_for(method), tuple(history)
        return self._open(lambda stream: self._run(stream, question, chunks, method, history,
                                                   generation or GenerationConfig()))

    def astream(self, question: str, chunks: Sequence[str], method: str | ContextMethod | None = None,
                history: Sequence[ChatTurn] = (), generation: GenerationConfig | None = None) -> AsyncAnswerStream:
        """`stream` for asyncio: ``async for piece in engine.astream(...)``; the model runs in a worker thread.

        Gives the same pieces and `Answer` as `stream` with the same arguments (greedy decoding). Errors that
        `stream` raises before the first token are raised by the first ``__anext__`` (an empty question at once).
        """
        if not question or not question.strip():
            raise EmptyInputError("the question is empty; pass the text to answer")
        chunks, history = list(chunks), tuple(history)
        return AsyncAnswerStream(lambda: self.stream(question, chunks, method, history, generation))

    async def aanswer(self, question: str, chunks: Sequence[str], method: str | ContextMethod | None = None,
                      history: Sequence[ChatTurn] = (), generation: GenerationConfig | None = None) -> Answer:
        """`answer` for asyncio, without blocking the event loop (see `astream`)."""
        return await self.astream(question, chunks, method, history, generation).collect()

    def session(self, session_id: str | None = None, history: Sequence[ChatTurn] = ()) -> ChatSession:
        """A chat session: a conversation over retrieved chunks whose cache is kept between turns, so that each
        turn forwards only its new message (see `kvpacket_rag.session`).

        Args:
            session_id: the key of its kept cache in `sessions` (default: a new unique one). Sessions made with
                the same id share the kept cache (an application that keeps conversations by id).
            history: turns the conversation starts from.
        """
        return ChatSession(self, session_id, history)

    def chat(self, messages: Sequence[tuple[str, str]], generation: GenerationConfig | None = None) -> AnswerStream:
        """Stream a plain generation: the whole chat prompt runs through the model (no packets, no cached preamble).

        Args:
            messages: ``(role, content)`` pairs, roles ``system``, ``user`` and ``assistant``, rendered with the
                model's chat template (see `PromptFormatter.chat_ids`).
            generation: decoding settings (default: greedy, 64 tokens).

        The `Answer` has method ``plain``, ``context_tokens`` 0 and the whole prompt as ``question_tokens``.

        Raises:
            EmptyInputError, ContextTooLongError (before any token is produced); QueueFullError,
            QueueTimeoutError (from the first iteration).
        """
        generation = generation or GenerationConfig()
        ids = self.formatter.chat_ids(messages)
        self.model.check_context(len(ids) + generation.max_new_tokens, "prompt plus answer")

        def prepare(buffer: KVBuffer, reserve: int) -> PreparedContext:
            buffer.reserve(reserve)
            return PreparedContext(PacketCache(buffer, 0), 0)

        return self._open(lambda stream: self._scheduled(stream, "plain", prepare, ids, generation))

    def achat(self, messages: Sequence[tuple[str, str]], generation: GenerationConfig | None = None
              ) -> AsyncAnswerStream:
        """`chat` for asyncio (``async for piece in engine.achat(...)``); the model runs in a worker thread."""
        messages = list(messages)
        return AsyncAnswerStream(lambda: self.chat(messages, generation))

    @staticmethod
    def _open(run: Callable[[AnswerStream], Iterator[str]]) -> AnswerStream:
        """A stream whose pieces come from ``run(stream)``, which sets ``stream.answer`` at the end."""
        stream = AnswerStream(iter(()))
        stream._pieces = run(stream)
        return stream

    @staticmethod
    def _open_async(open_stream: Callable[[], AnswerStream]) -> AsyncAnswerStream:
        """An async stream over the stream ``open_stream()`` opens in a worker thread."""
        return AsyncAnswerStream(open_stream)

    def _run(self, stream: AnswerStream, question, chunks, method, history, generation) -> Iterator[str]:
        suffix = self.formatter.suffix_ids(question, history)

        def prepare(buffer: KVBuffer, reserve: int) -> PreparedContext:  # runs on the scheduler thread
            context = method.prepare(self, chunks, buffer, reserve)
            self.model.check_context(context.length + reserve, "context plus question and answer")
            return context

        yield from self._scheduled(stream, method.name, prepare, suffix, generation)

    def _scheduled(self, stream: AnswerStream, method: str, prepare: Prepare, suffix: list[int],
                   generation: GenerationConfig, keep: Keep | None = None) -> Iterator[str]:
        """Run one request through the scheduler, yield its pieces, then set ``stream.answer``."""
        request = Request(prepare, suffix, generation, self.model.tokenizer, keep)
        yield from self.scheduler.run(request)
        context, streamer = request.context, request.streamer
        timings = {"queue_s": request.timings["queue_s"], "packet_load_s": context.packet_load_s,
                   "packet_build_s": context.packet_build_s, "assembly_s": context.assembly_s,
                   "context_prefill_s": context.context_prefill_s,
                   "question_prefill_s": request.timings["question_prefill_s"],
                   "ttft_s": request.timings["ttft_s"], "total_s": request.timings["total_s"]}
        question_flops = forward_flops(self.model.config, len(suffix), context.length, logits_tokens=1)
        stream.answer = Answer(streamer.text, list(streamer.ids), method, timings, context.context_flops,
                               context.context_flops + question_flops, context.length, len(suffix),
                               context.forwarded_tokens + len(suffix), context.packet_keys,
                               context.packets_built, context.tokens_built, request.finish_reason)

    def release_buffers(self) -> None:
        """Drop the KV storage kept for reuse between questions, when none is in progress (the next question
        allocates afresh). Waits up to a second for the decode loop to wind down after the last answer."""
        self.scheduler.wait_idle(timeout=1.0)
        self.scheduler.release()
