"""Continuous batching: one decode loop advances every active question of an engine together.

Callers on any thread hand a `Request` to the engine's `Scheduler` and iterate over its text pieces. One
scheduler thread runs all model work for answers: between two forwards it admits waiting requests (up to
`SchedulerConfig.max_batch` active) and assembles each one's context straight into its row of a shared
`BatchKV`; then one forward (`forward_rows`) prefills the joiners' questions (with the context tokens their method
left to recompute, at their own positions) and advances every other active request by one token, and each request
gets its next token (a joiner: its first). Requests leave between
forwards: finished, stopped by a stop string or an end-of-sequence token, out of token budget, or closed by their
consumer. Each keeps its own context length, positions, mask, stop strings, sampling settings and budget, so its
tokens are those it would get alone.

Admission control: at most `SchedulerConfig.max_queue` requests wait for a place; one more raises
`QueueFullError`, and a request still waiting after `SchedulerConfig.queue_timeout_s` raises `QueueTimeoutError`.
A request that fails (context too long, incompatible packet) fails alone: the others continue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from .batchcache import BatchKV, forward_rows
from .context import PreparedContext
from .errors import QueueFullError, QueueTimeoutError
from .generation import GenerationConfig, TextStreamer, choose_token
from .kvcache import KVBuffer
from .models import LoadedModel

log = logging.getLogger(__name__)

SCHEDULER_THREAD = "kvpacket-scheduler"
"""Name of the thread that runs an engine's decode loop (it exits when no request is left)."""

Prepare = Callable[[KVBuffer, int], PreparedContext]
"""Assembles a request's ``preamble | context`` into the buffer given, keeping the given number of positions free."""

Keep = Callable[[BatchKV, int, int], None]
"""Called as ``keep(batch, row, length)`` when a request's answer is complete, before its row is freed: the row's
first ``length`` positions hold its context, question and every answer token forwarded (a chat session keeps
them for its next turn)."""

_PIECE, _DONE, _ERROR = "piece", "done", "error"


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of an engine's request scheduler.

    Attributes:
        max_batch: questions decoded together at most (>= 1); more wait in the queue.
        max_queue: questions allowed to wait for a place (>= 0); one more raises `QueueFullError`.
        queue_timeout_s: seconds a question may wait for a place (> 0) before `QueueTimeoutError`.
    """

    max_batch: int = 16
    max_queue: int = 256
    queue_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if not self.queue_timeout_s > 0:
            raise ValueError("queue_timeout_s must be > 0 seconds")


class Request:
    """One question on its way through the scheduler, and what it produced.

    Args:
        prepare: builds the context into the buffer it is given (called on the scheduler thread).
        suffix: token ids run after the context (question and assistant header).
        generation: decoding settings.
        keep: called with the request's row once its answer is complete (not when it fails or is closed early).

    Once done: ``context`` (the `PreparedContext`, without its cache), ``streamer`` (text and token ids),
    ``finish_reason`` (``stop`` or ``length``) and ``timings`` (``queue_s``, ``question_prefill_s``, ``ttft_s``,
    ``total_s``: seconds from submission).
    """

    def __init__(self, prepare: Prepare, suffix: list[int], generation: GenerationConfig, tokenizer,
                 keep: Keep | None = None):
        self.prepare, self.suffix, self.generation, self.keep = prepare, suffix, generation, keep
        self.streamer = TextStreamer(tokenizer, generation.stop)
        self.generator = torch.Generator().manual_seed(generation.seed) if generation.seed is not None else None
        self.context: PreparedContext | None = None
        self.finish_reason = "stop"
        self.timings: dict[str, float] = {}
        self.submitted = 0.0
        self.admitted = False
        self.cancelled = False
        self.length = 0  # positions in the request's cache row
        self.pending: list[int] | None = None  # tokens of its next forward (the suffix, then one); None once done
        self.positions: list[int] = []  # the positions of the pending tokens
        self.events: queue.SimpleQueue = queue.SimpleQueue()

    def _elapsed(self) -> float:
        return time.perf_counter() - self.submitted


class Scheduler:
    """The decode loop of one engine (see the module docstring).

    Args:
        model: the engine's model.
        lock: the engine's model lock; the loop holds it for each step (admission, then one forward).
        config: queue and batch limits.
        stop_ids: token ids that end every answer.
    """

    def __init__(self, model: LoadedModel, lock: threading.RLock, config: SchedulerConfig, stop_ids: set[int]):
        self.model, self.config, self.stop_ids = model, config, stop_ids
        self._lock = lock
        self._cond = threading.Condition()
        self._pending: deque[Request] = deque()
        self._active: list[Request] = []  # request i owns row i of the batch; only the loop thread touches it
        self._thread: threading.Thread | None = None
        self.batch = BatchKV(model)
        self._stats = {"requests": 0, "failed": 0, "rejected": 0, "timed_out": 0, "steps": 0, "max_batch": 0,
                       "prepare_s": 0.0, "forward_s": 0.0}

    # ---- caller side ---------------------------------------------------------------------------------------------

    def run(self, request: Request) -> Iterator[str]:
        """Submit ``request`` and yield its text pieces as they are decoded; closing the iterator cancels it.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            QueueTimeoutError: no place in the batch within ``queue_timeout_s``.
            Whatever preparing or prefilling the request raised (ContextTooLongError, IncompatiblePacketError, ...).
        """
        self._submit(request)
        try:
            while True:
                kind, value = self._next_event(request)
                if kind == _PIECE:
                    yield value
                elif kind == _DONE:
                    return
                else:
                    raise value
        finally:
            request.cancelled = True  # a no-op once done; otherwise the loop drops it before its next step

    def stats(self) -> dict:
        """Counters: ``requests`` admitted, ``failed``, ``rejected`` (queue full), ``timed_out``, ``steps`` (forwards),
        ``max_batch`` (most requests in the batch at once so far), seconds the loop spent assembling contexts
        (``prepare_s``) and in forwards (``forward_s``), and now: ``active``, ``queued``, ``running``
        (whether the loop thread is alive; it exits when no request is left) and ``batch_bytes``."""
        with self._cond:
            return {**self._stats, "active": len(self._active), "queued": len(self._pending),
                    "running": self._thread is not None, "batch_bytes": self.batch.nbytes}

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is active or queued and the loop thread has exited; False on timeout."""
        deadline = time.perf_counter() + timeout
        while self.stats()["running"]:
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.002)
        return True

    def release(self) -> None:
        """Drop the batch storage kept between questions, if no question is being answered."""
        with self._cond:
            if self._thread is None:
                self.batch.release()

    def _submit(self, request: Request) -> None:
        with self._cond:
            if len(self._pending) >= self.config.max_queue:
                self._stats["rejected"] += 1
                raise QueueFullError(
                    f"{len(self._pending)} questions are already waiting for a place (max_queue="
                    f"{self.config.max_queue}); retry later, or raise SchedulerConfig.max_queue / max_batch")
            request.submitted = time.perf_counter()
            self._pending.append(request)
            if self._thread is None:
                # not a daemon: the interpreter waits for the step in progress (a model forward must not run while
                # the process tears down), and the loop exits as soon as no request is left
                self._thread = threading.Thread(target=self._loop, name=SCHEDULER_THREAD)
                self._thread.start()
            self._cond.notify()

    def _next_event(self, request: Request) -> tuple[str, object]:
        while not request.admitted:
            left = self.config.queue_timeout_s - request._elapsed()
            try:
                return request.events.get(timeout=max(left, 0.0))
            except queue.Empty:
                if self._withdraw(request):
                    raise QueueTimeoutError(
                        f"the question waited {self.config.queue_timeout_s:g} s for a place in the batch "
                        f"(max_batch={self.config.max_batch} answers in progress); retry later, or raise "
                        "SchedulerConfig.queue_timeout_s / max_batch") from None
        return request.events.get()

    def _withdraw(self, request: Request) -> bool:
        """Take a request that is still waiting out of the queue; False when the loop already admitted it."""
        with self._cond:
            if request.admitted:
                return False
            self._pending.remove(request)
            self._stats["timed_out"] += 1
            return True

    # ---- the loop ------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    self._drop_cancelled()
                    with self._cond:
                        joiners = self._take_joiners()
                        if not joiners and not self._active:
                            self._thread = None
                            return
                    self._admit(joiners)
                    self._step()
                time.sleep(0)  # let threads waiting for the engine lock (packet builds) in between steps
        except BaseException as error:  # a bug: fail every request rather than leave its consumer waiting
            log.exception("the decode loop stopped")
            with self._cond:
                stranded = self._active + list(self._pending)
                self._active, self._pending, self._thread = [], deque(), None
            for request in stranded:
                request.events.put((_ERROR, error))

    def _take_joiners(self) -> list[Request]:
        joiners = []
        while self._pending and len(self._active) + len(joiners) < self.config.max_batch:
            request = self._pending.popleft()
            if not request.cancelled:
                request.admitted = True
                request.timings["queue_s"] = request._elapsed()
                joiners.append(request)
        return joiners

    def _admit(self, joiners: list[Request]) -> None:
        """Prepare each joiner's context in its own row; its question runs in the next step."""
        started = time.perf_counter()
        for request in joiners:
            row = len(self._active)
            try:
                reserve = len(request.suffix) + request.generation.max_new_tokens
                context = request.prepare(self.batch.row_buffer(row), reserve)
            except Exception as error:  # this request alone fails
                self._fail(request, error)
                continue
            # the row holds the cache now; the request keeps no view of storage that growth may replace
            request.context = replace(context, cache=None)
            # context tokens the method left to recompute run in the question's own forward, at their positions
            request.length = context.length
            request.pending = list(context.deferred_ids) + list(request.suffix)
            request.positions = list(context.deferred_positions) + list(
                range(context.length, context.length + len(request.suffix)))
            self._active.append(request)
        with self._cond:
            self._stats["prepare_s"] += time.perf_counter() - started

    def _step(self) -> None:
        """One forward for every active request: the joiners' questions and one decode token of the others."""
        if not self._active:
            return
        active = self._active
        started = time.perf_counter()
        try:
            logits = forward_rows(self.batch, 0, [r.length for r in active], [r.pending for r in active],
                                  [r.positions for r in active])
        except Exception as error:
            self._active = []
            for request in active:
                self._fail(request, error)
            return
        forward_s = time.perf_counter() - started
        joined = [r for r in active if "question_prefill_s" not in r.timings]
        with self._cond:
            self._stats["steps"] += 1
            self._stats["forward_s"] += forward_s
            self._stats["requests"] += len(joined)
            self._stats["max_batch"] = max(self._stats["max_batch"], len(active))
        for request in joined:
            request.timings["question_prefill_s"] = forward_s
        for request, row_logits in zip(active, logits):
            request.length = request.positions[-1] + 1
            self._emit(request, row_logits)
        self._remove_finished()

    def _emit(self, request: Request, logits: torch.Tensor) -> None:
        """Choose the request's next token from its logits, hand out the new text, decide whether it is done."""
        token = choose_token(logits, request.generation, request.generator)
        request.timings.setdefault("ttft_s", request._elapsed())
        streamer = request.streamer
        if token in self.stop_ids:
            return self._finish(request, "stop")
        piece = streamer.push(token)
        if piece:
            request.events.put((_PIECE, piece))
        if streamer.stopped:
            self._finish(request, "stop")
        elif len(streamer.ids) >= request.generation.max_new_tokens:
            self._finish(request, "length")
        else:
            request.pending, request.positions = [token], [request.length]

    def _finish(self, request: Request, reason: str) -> None:
        tail = request.streamer.flush()
        if tail:
            request.events.put((_PIECE, tail))
        request.finish_reason = reason
        request.pending = None
        if request.keep is not None:
            try:
                request.keep(self.batch, self._active.index(request), request.length)
            except Exception as error:  # the answer is complete, but its caller asked for the row as well
                self._fail(request, error)
                return
        request.timings["total_s"] = request._elapsed()
        request.events.put((_DONE, None))

    def _fail(self, request: Request, error: BaseException) -> None:
        request.pending = None
        with self._cond:
            self._stats["failed"] += 1
        request.events.put((_ERROR, error))

    def _remove_finished(self) -> None:
        """Free the rows of finished requests, keeping the active rows contiguous (the last row fills a hole)."""
        for row in range(len(self._active) - 1, -1, -1):
            if self._active[row].pending is None:
                self._free_row(row)

    def _drop_cancelled(self) -> None:
        for row in range(len(self._active) - 1, -1, -1):
            if self._active[row].cancelled:
                self._free_row(row)

    def _free_row(self, row: int) -> None:
        last = len(self._active) - 1
        if row != last:
            self.batch.move_row(last, row, self._active[last].length)
            self._active[row] = self._active[last]
        self._active.pop()
