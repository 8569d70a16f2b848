"""Async iteration over synchronous streams without blocking the event loop.

`iterate_in_thread` runs a synchronous iterator (an engine stream, a framework's chunk generator) in a worker
thread and hands its items to the event loop through an `asyncio.Queue`. The loop keeps serving other
coroutines while the model computes. When the consumer stops early (``break``, ``aclose()``, task cancellation)
the worker stops after the item in progress, the synchronous iterator is closed (its ``finally`` blocks run, so
an engine stream returns its cache buffer), and ``aclose()`` returns once the worker has finished.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterable, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = "item", "end", "error"

STREAM_THREAD = "kvpacket-stream"
"""Name of the worker thread behind every async stream."""


async def iterate_in_thread(open_items: Callable[[], Iterable[T]]) -> AsyncIterator[T]:
    """Yield the items of ``open_items()`` as they are produced, computing them in a worker thread.

    Args:
        open_items: called once, in the worker thread, to create the iterable (so blocking set-up work such as
            building packets also stays off the event loop).

    Exceptions raised by ``open_items`` or by the iteration are re-raised to the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def post(kind: str, value: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            stop.set()

    def work() -> None:
        items = None
        try:
            items = iter(open_items())
            for item in items:
                if stop.is_set():
                    break
                post(_ITEM, item)
            post(_END, None)
        except BaseException as error:  # handed to the consumer
            post(_ERROR, error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name=STREAM_THREAD, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == _ITEM:
                yield value
            elif kind == _END:
                return
            else:
                raise value
    finally:
        stop.set()
        await asyncio.shield(asyncio.to_thread(worker.join))
