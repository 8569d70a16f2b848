"""The engine's request scheduler: batched answers equal answers alone; queue limits; early close; lone failures.

Holding the engine's model lock (``engine._compute``) pauses the decode loop between two steps, so a test can
line requests up to join the batch together, or make one join while others are mid-way.
"""

from __future__ import annotations

import threading
import time

import pytest

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.errors import ContextTooLongError, IncompatiblePacketError, QueueFullError, QueueTimeoutError
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.methods import PacketMethod, get_method
from kvpacket_rag.scheduler import Request, SchedulerConfig
from kvpacket_rag.testing import make_tiny_model

CHUNKS = ["Ada Lovelace was born in London in 1815.", "Alan Turing studied at Cambridge and worked at Bletchley.",
          "Grace Hopper served in the navy and wrote the first compiler for a programming language.",
          "Katherine Johnson computed trajectories for the Mercury and Apollo missions at NASA."]
# different questions over different numbers of chunks: different context and suffix lengths
JOBS = [("Where was Ada Lovelace born?", CHUNKS[:1]), ("Who served in the navy and wrote a compiler?", CHUNKS),
        ("What did Katherine Johnson compute?", CHUNKS[2:]), ("Where did Turing study?", [])]
GREEDY = GenerationConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> PacketEngine:
    return PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3))


@pytest.fixture(scope="module")
def alone(engine) -> list:
    """Each job's answer with nothing else in the batch."""
    answers = [engine.answer(q, chunks, generation=GREEDY) for q, chunks in JOBS]
    assert all(a.finish_reason == "length" for a in answers)  # full length: the jobs overlap in the batch
    return answers


class Consumer(threading.Thread):
    """Iterates one stream in its own thread; records the answer or the error."""

    def __init__(self, stream, stop_after: int | None = None):
        super().__init__(daemon=True)
        self.stream, self.stop_after = stream, stop_after
        self.pieces, self.error, self.first = [], None, threading.Event()

    def run(self) -> None:
        try:
            for piece in self.stream:
                self.pieces.append(piece)
                self.first.set()
                if self.stop_after is not None and len(self.pieces) >= self.stop_after:
                    self.stream.close()
                    break
        except Exception as error:  # noqa: BLE001 - recorded for the test
            self.error = error
        finally:
            self.first.set()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.002)


def start_together(engine: PacketEngine, streams) -> list[Consumer]:
    """Start consumers while the loop is paused, so that all of them join the batch in the same step."""
    consumers = [Consumer(s) for s in streams]
    with engine._compute:
        before = engine.scheduler.stats()["queued"]
        for consumer in consumers:
            consumer.start()
        wait_for(lambda: engine.scheduler.stats()["queued"] >= before + len(consumers))
    return consumers


def test_tokens_in_a_batch_equal_tokens_alone_with_one_joining_midway(engine, alone):
    stats = engine.scheduler.stats()
    first = start_together(engine, [engine.stream(q, c, generation=GREEDY) for q, c in JOBS[:3]])
    first[0].first.wait(10)
    with engine._compute:  # the three are mid-way: the fourth joins between two of their steps
        late = Consumer(engine.stream(*JOBS[3], generation=GREEDY))
        late.start()
        wait_for(lambda: engine.scheduler.stats()["queued"] == 1)
        assert engine.scheduler.stats()["active"] == 3
    for consumer in [*first, late]:
        consumer.join(30)
    for consumer, want in zip([*first, late], alone):
        assert consumer.error is None
        got = consumer.stream.answer
        assert got.token_ids == want.token_ids and got.text == want.text == "".join(consumer.pieces)
        assert got.context_tokens == want.context_tokens
    assert len({a.context_tokens for a in alone}) == len(alone)  # different context lengths in one batch
    after = engine.scheduler.stats()
    assert after["max_batch"] == 4 and after["requests"] - stats["requests"] == 4
    assert after["prepare_s"] > stats["prepare_s"] and after["forward_s"] > stats["forward_s"]


def test_sampling_with_a_seed_gives_the_same_answer_in_a_batch(engine):
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=7)
    want = engine.answer(JOBS[0][0], JOBS[0][1], generation=sampled).token_ids
    consumers = start_together(engine, [engine.stream(JOBS[0][0], JOBS[0][1], generation=sampled),
                                        engine.stream(*JOBS[1], generation=GREEDY)])
    for consumer in consumers:
        consumer.join(30)
    assert consumers[0].stream.answer.token_ids == want


def test_stop_strings_and_budgets_are_per_request(engine, alone):
    text = alone[1].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    short = GenerationConfig(max_new_tokens=3)
    consumers = start_together(engine, [engine.stream(*JOBS[1], generation=GenerationConfig(16, stop=(stop,))),
                                        engine.stream(*JOBS[2], generation=short),
                                        engine.stream(*JOBS[0], generation=GREEDY)])
    for consumer in consumers:
        consumer.join(30)
    stopped, cut, full = (c.stream.answer for c in consumers)
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"
    assert cut.token_ids == alone[2].token_ids[:3] and cut.finish_reason == "length"
    assert full.token_ids == alone[0].token_ids


def test_failing_requests_fail_alone(engine, alone):
    """A context too long and packets of an adapter made for another model fail; the batch goes on."""
    foreign = PacketAdapter.initialize(make_tiny_model("llama", engine.model.tokenizer, seed=1), 4, 4)
    consumers = start_together(engine, [
        engine.stream(*JOBS[0], generation=GREEDY),
        engine.stream("Where?", CHUNKS, generation=GenerationConfig(max_new_tokens=10**6)),
        engine.stream(*JOBS[1], generation=GREEDY),
        engine.stream(*JOBS[2], method=PacketMethod(adapter=foreign, name="foreign"), generation=GREEDY)])
    for consumer in consumers:
        consumer.join(30)
    assert isinstance(consumers[1].error, ContextTooLongError)
    assert isinstance(consumers[3].error, IncompatiblePacketError)
    assert consumers[0].stream.answer.token_ids == alone[0].token_ids
    assert consumers[2].stream.answer.token_ids == alone[1].token_ids
    assert engine.scheduler.wait_idle()
    assert engine.answer(*JOBS[2], generation=GREEDY).token_ids == alone[2].token_ids


def test_a_request_whose_keep_hook_fails_fails_alone(engine, alone):
    """A failing ``keep`` (called with the request's row once its answer is complete) fails that request only."""
    def broken(batch, row, length):
        raise RuntimeError("cannot keep the row")

    question, chunks = JOBS[1]
    method = get_method("kv_packet")
    request = Request(lambda buffer, reserve: method.prepare(engine, chunks, buffer, reserve),
                      engine.formatter.suffix_ids(question), GREEDY, engine.model.tokenizer, keep=broken)
    failing = Consumer(engine.scheduler.run(request))
    other = Consumer(engine.stream(*JOBS[0], generation=GREEDY))
    with engine._compute:
        failing.start()
        other.start()
        wait_for(lambda: engine.scheduler.stats()["queued"] >= 2)
    for consumer in (failing, other):
        consumer.join(30)
    assert isinstance(failing.error, RuntimeError) and "".join(failing.pieces) == alone[1].text
    assert other.error is None and other.stream.answer.token_ids == alone[0].token_ids


def test_queue_full_is_refused_at_once(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None, scheduler=SchedulerConfig(max_batch=1, max_queue=1))
    with engine._compute:  # nothing is admitted while paused: the first question fills the queue
        waiting = Consumer(engine.stream(*JOBS[0], generation=GREEDY))
        waiting.start()
        wait_for(lambda: engine.scheduler.stats()["queued"] == 1)
        with pytest.raises(QueueFullError, match="max_queue=1"):
            next(iter(engine.stream(*JOBS[1], generation=GREEDY)))
    waiting.join(30)
    assert waiting.error is None and waiting.stream.answer.token_ids
    assert engine.scheduler.stats()["rejected"] == 1


def test_waiting_longer_than_the_timeout_fails_and_leaves_the_queue(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None, scheduler=SchedulerConfig(max_batch=1, queue_timeout_s=0.2))
    running = Consumer(engine.stream(*JOBS[0], generation=GREEDY))
    running.start()
    running.first.wait(10)
    with engine._compute:  # the only place is taken and the loop is paused
        with pytest.raises(QueueTimeoutError, match="0.2 s"):
            next(iter(engine.stream(*JOBS[1], generation=GREEDY)))
        assert engine.scheduler.stats()["queued"] == 0
    running.join(30)
    assert running.error is None and engine.scheduler.stats()["timed_out"] == 1


def test_a_client_that_stops_frees_its_place(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None, scheduler=SchedulerConfig(max_batch=1, queue_timeout_s=5))
    quitter = Consumer(engine.stream(*JOBS[0], generation=GenerationConfig(max_new_tokens=2000)), stop_after=1)
    quitter.start()
    quitter.join(30)
    answer = engine.answer(*JOBS[1], generation=GREEDY)  # gets the only place long before 2000 tokens
    assert quitter.stream.answer is None and answer.token_ids
    assert engine.scheduler.wait_idle()


def test_concurrent_threads_are_decoded_together(engine, alone):
    results = {}

    def ask(n: int) -> None:
        results[n] = engine.answer(*JOBS[n], generation=GREEDY)

    before = engine.scheduler.stats()["steps"]
    with engine._compute:
        threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(JOBS))]
        for thread in threads:
            thread.start()
        wait_for(lambda: engine.scheduler.stats()["queued"] == len(JOBS))
    for thread in threads:
        thread.join(30)
    assert [results[n].token_ids for n in range(len(JOBS))] == [a.token_ids for a in alone]
    assert engine.scheduler.stats()["steps"] - before == GREEDY.max_new_tokens  # one forward per token for all


@pytest.mark.parametrize("bad", [dict(max_batch=0), dict(max_queue=-1), dict(queue_timeout_s=0)])
def test_scheduler_config_is_validated(bad):
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)


def test_real_model_answers_in_a_batch_equal_answers_alone(default_model):
    """SmolLM2 (fp32, no adapter): three questions over different chunks, decoded together, one joining late."""
    engine = PacketEngine(default_model, adapter=None)
    jobs = JOBS[:3]
    generation = GenerationConfig(max_new_tokens=12)
    alone = [engine.answer(q, chunks, generation=generation) for q, chunks in jobs]
    first = start_together(engine, [engine.stream(q, c, generation=generation) for q, c in jobs[:2]])
    first[0].first.wait(30)
    late = Consumer(engine.stream(*jobs[2], generation=generation))
    late.start()
    for consumer in [*first, late]:
        consumer.join(60)
    assert [c.stream.answer.token_ids for c in [*first, late]] == [a.token_ids for a in alone]
    assert engine.scheduler.stats()["max_batch"] >= 2


def test_a_process_exits_cleanly_right_after_closing_a_stream(tmp_path):
    """The loop thread finishes its step before the interpreter tears down (no abort, no hang)."""
    import subprocess
    import sys

    script = tmp_path / "exit_early.py"
    script.write_text(
        "from transformers import AutoTokenizer\n"
        "from kvpacket_rag.engine import PacketEngine\n"
        "from kvpacket_rag.generation import GenerationConfig\n"
        "from kvpacket_rag.models import default_model_dir\n"
        "from kvpacket_rag.testing import make_tiny_model\n"
        "model = make_tiny_model('llama', AutoTokenizer.from_pretrained(default_model_dir()))\n"
        "engine = PacketEngine(model, adapter=None)\n"
        "for n in range(3):\n"
        "    stream = engine.stream('Where was Ada born?', ['Ada was born in London.'],\n"
        "                           generation=GenerationConfig(max_new_tokens=1000))\n"
        "    next(iter(stream))\n"
        "    stream.close()\n"
        "left = engine.stream('Who?', ['Bob.'], generation=GenerationConfig(max_new_tokens=200))\n"
        "next(iter(left))  # abandoned, not closed: the process still ends once it is done\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_release_buffers_right_after_an_answer_frees_the_batch_storage(tiny_llama):
    """The decode loop may still be winding down when an answer returns; releasing waits for it."""
    engine = PacketEngine(tiny_llama, adapter=None)
    for _ in range(5):
        engine.answer(*JOBS[0], generation=GenerationConfig(max_new_tokens=2))
        engine.release_buffers()
        assert engine.scheduler.batch.nbytes == 0
