"""Async streams (worker thread + asyncio queue) and one engine shared by threads and coroutines."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.aio import iterate_in_thread
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.errors import ContextTooLongError, EmptyInputError
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.testing import make_tiny_model, stream_threads, ticking

CHUNKS = ["Ada Lovelace was born in London.", "Alan Turing studied at Cambridge.", "Grace Hopper served in the navy."]
QUESTIONS = ["Where was Ada born?", "Who studied at Cambridge?", "Who served in the navy?", "Name one person."]
GREEDY = GenerationConfig(max_new_tokens=12)
LONG = GenerationConfig(max_new_tokens=200)


@pytest.fixture(scope="module")
def untied_llama(tokenizer):
    """A tiny Llama with an untied LM head: its greedy answers vary with the question."""
    return make_tiny_model("llama", tokenizer, tie_word_embeddings=False)


@pytest.fixture
def engine(untied_llama) -> PacketEngine:
    return PacketEngine(untied_llama, adapter=PacketAdapter.initialize(untied_llama, 4, 4, seed=3))


def test_items_arrive_while_the_event_loop_keeps_running():
    def slow():
        for n in range(5):
            time.sleep(0.02)
            yield n

    async def collect():
        return [n async for n in iterate_in_thread(slow)]

    items, ticks = asyncio.run(ticking(collect()))
    assert items == [0, 1, 2, 3, 4]
    assert ticks > 20  # a blocking loop would see none during the 0.1 s of work


def test_errors_reach_the_consumer_and_stopping_early_closes_the_source():
    closed = threading.Event()

    def numbers():
        try:
            for n in range(1000):
                time.sleep(0.001)
                yield n
        finally:
            closed.set()

    def failing():
        yield 1
        raise ValueError("broken source")

    async def run():
        async for n in iterate_in_thread(numbers):
            if n == 2:
                break
        await asyncio.sleep(0.05)  # the abandoned generator is finalized by the loop
        with pytest.raises(ValueError, match="broken source"):
            async for _ in iterate_in_thread(failing):
                pass

    asyncio.run(run())
    assert closed.is_set() and not stream_threads()


def test_async_stream_gives_the_same_pieces_and_tokens_as_the_sync_stream(engine):
    async def run(question):
        stream = engine.astream(question, CHUNKS, generation=GREEDY)
        pieces = [piece async for piece in stream]
        return pieces, stream.answer

    for question in QUESTIONS[:2]:
        sync = engine.stream(question, CHUNKS, generation=GREEDY)
        sync_pieces = list(sync)
        pieces, answer = asyncio.run(run(question))
        assert pieces == sync_pieces
        assert answer.token_ids == sync.answer.token_ids and answer.text == sync.answer.text
    answer = asyncio.run(engine.aanswer(QUESTIONS[2], CHUNKS, method="full_recompute", generation=GREEDY))
    assert answer.token_ids == engine.answer(QUESTIONS[2], CHUNKS, method="full_recompute", generation=GREEDY).token_ids
    plain = asyncio.run(engine.achat([("user", "Hello there")], GREEDY).collect())
    assert plain.token_ids == engine.chat([("user", "Hello there")], GREEDY).collect().token_ids


def test_another_coroutine_keeps_ticking_while_an_answer_streams(engine):
    answer, ticks = asyncio.run(ticking(engine.aanswer(QUESTIONS[0], CHUNKS, generation=GREEDY)))
    assert answer.token_ids and ticks > len(answer.token_ids)


def test_stopping_an_async_stream_stops_the_generation_and_frees_its_place(engine):
    async def stop_by_aclose():
        stream = engine.astream(QUESTIONS[0], CHUNKS, generation=LONG)
        async for _ in stream:
            break
        await stream.aclose()
        return stream

    async def stop_by_cancel():
        first = asyncio.Event()

        async def consume():
            async for _ in engine.astream(QUESTIONS[1], CHUNKS, generation=LONG):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    stream = asyncio.run(stop_by_aclose())
    assert stream.answer is None  # ended before the answer was complete
    assert engine.scheduler.wait_idle() and not stream_threads()
    asyncio.run(stop_by_cancel())
    assert engine.scheduler.wait_idle() and not stream_threads()  # its place in the batch is free, no thread left
    assert engine.answer(QUESTIONS[0], CHUNKS, generation=GREEDY).token_ids  # the engine still answers


def test_async_errors_are_raised_by_the_first_piece(engine):
    with pytest.raises(EmptyInputError):
        engine.astream("  ", CHUNKS)

    async def too_long():
        async for _ in engine.astream("Where?", CHUNKS, generation=GenerationConfig(max_new_tokens=10**6)):
            pass

    with pytest.raises(ContextTooLongError):
        asyncio.run(too_long())
    assert engine.scheduler.wait_idle() and engine.scheduler.stats()["active"] == 0


def test_one_engine_serves_many_threads_with_the_answers_of_one(engine):
    alone = {q: engine.answer(q, CHUNKS, generation=GREEDY).token_ids for q in QUESTIONS}
    assert len({tuple(ids) for ids in alone.values()}) > 1  # the answers differ: a mix-up would show
    shared = PacketEngine(engine.model, adapter=engine.adapter)  # cold: packets and preamble built concurrently
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: shared.answer(q, CHUNKS, generation=GREEDY).token_ids, QUESTIONS * 2))
    assert together == [alone[q] for q in QUESTIONS * 2]
    assert shared.counters["packets_built"] == len(CHUNKS)  # each packet built once, under the engine lock


def test_one_thread_may_interleave_several_streams(engine):
    first, second = (engine.stream(q, CHUNKS, generation=GREEDY) for q in QUESTIONS[:2])
    for _ in zip(first, second):
        pass
    list(first), list(second)
    assert first.answer.token_ids == engine.answer(QUESTIONS[0], CHUNKS, generation=GREEDY).token_ids
    assert second.answer.token_ids == engine.answer(QUESTIONS[1], CHUNKS, generation=GREEDY).token_ids


def test_closing_a_sync_stream_early_frees_its_place(engine):
    stream = engine.stream(QUESTIONS[0], CHUNKS, generation=LONG)
    next(iter(stream))
    stream.close()
    assert engine.scheduler.wait_idle() and stream.answer is None
