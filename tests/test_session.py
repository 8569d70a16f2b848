"""Chat sessions: each turn through the kept cache equals a fresh assembly of the same conversation, forwarding
only the new tokens; other documents reassemble; kept caches are bounded in bytes and rebuilt after eviction."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from kvpacket_rag import GenerationConfig, InMemoryStore, PacketAdapter, PacketEngine
from kvpacket_rag.errors import EmptyInputError
from kvpacket_rag.prompt import ChatTurn
from kvpacket_rag.session import SessionCache
from kvpacket_rag.testing import ARCHS, make_tiny_model, ticking

DOCS_A = ["Ada Lovelace was born in London in 1815.", "Charles Babbage designed the Analytical Engine."]
DOCS_B = ["Grace Hopper wrote the first compiler.", "The Harvard Mark I was built in 1944."]
GEN = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module", params=ARCHS)
def untied_model(request, tokenizer):
    """A tiny random model with an untied head: its answers vary (a tied one repeats one token)."""
    return make_tiny_model(request.param, tokenizer, tie_word_embeddings=False)


@pytest.fixture
def tiny_engine(untied_model) -> PacketEngine:
    return PacketEngine(untied_model, adapter=PacketAdapter.initialize(untied_model, 4, 4, seed=3),
                        store=InMemoryStore())


class Logits:
    """Every next-token logit row the model produces while active (prefill and each decode step)."""

    def __init__(self, engine: PacketEngine):
        self.head = engine.model.model.get_output_embeddings()  # the one module every path's logits come from
        self.rows: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        self.rows.clear()
        self._hook = self.head.register_forward_hook(
            lambda m, a, out: self.rows.append(out.reshape(-1, out.shape[-1])[-1].clone()))
        return self.rows

    def __exit__(self, *exc) -> None:
        self._hook.remove()


def turn_and_fresh(engine: PacketEngine, session, question: str, chunks, generation=GEN, atol=2e-5):
    """Answer through the session and by a fresh assembly of the same conversation; assert equal logits (``atol``:
    batched against one-by-one forwards round differently)."""
    history = tuple(session.history)
    with Logits(engine) as got:
        reused = session.answer(question, chunks, generation=generation)
    with Logits(engine) as want:
        fresh = engine.answer(question, chunks, history=history, generation=generation)
    assert len(got) == len(want) and reused.token_ids == fresh.token_ids
    for row, expected in zip(got, want):
        torch.testing.assert_close(row, expected, atol=atol, rtol=1e-4)
    kept = engine.sessions.state(session.id)
    suffix = engine.formatter.suffix_ids(question, history)
    assert kept.ids[: len(suffix)] == suffix  # exactly the tokens a fresh assembly feeds
    assert kept.context_length + len(kept.ids) == kept.length
    return reused, fresh


def test_turns_equal_fresh_assembly_of_the_conversation(tiny_engine):
    engine = tiny_engine
    session = engine.session()
    first, fresh = turn_and_fresh(engine, session, "Where was Ada born?", DOCS_A)
    assert first.forwarded_tokens == fresh.forwarded_tokens and first.context_tokens == fresh.context_tokens
    for question in ("When was that?", "Who designed the engine?"):
        reused, fresh = turn_and_fresh(engine, session, question, DOCS_A)
        assert reused.context_tokens > fresh.context_tokens  # the conversation so far came from the kept cache
        assert reused.forwarded_tokens < fresh.forwarded_tokens
        assert reused.packet_keys == fresh.packet_keys and reused.packets_built == 0
    # other documents: the conversation is reassembled over their packets, then reused again
    moved, fresh = turn_and_fresh(engine, session, "Who wrote the first compiler?", DOCS_B)
    assert moved.forwarded_tokens == fresh.forwarded_tokens and moved.packet_keys == fresh.packet_keys
    reused, fresh = turn_and_fresh(engine, session, "In which year?", DOCS_B)
    assert reused.forwarded_tokens < fresh.forwarded_tokens
    # evicted: the next turn rebuilds transparently
    engine.sessions.drop(session.id)
    rebuilt, fresh = turn_and_fresh(engine, session, "What else was built then?", DOCS_B)
    assert rebuilt.forwarded_tokens == fresh.forwarded_tokens
    assert [turn.user for turn in session.history] == ["Where was Ada born?", "When was that?",
                                                       "Who designed the engine?", "Who wrote the first compiler?",
                                                       "In which year?", "What else was built then?"]


def test_answer_cut_by_a_stop_string_or_the_token_budget_and_closed_book(tiny_engine):
    """The last generated token is not forwarded when a stop string or the budget ends the answer; the next turn
    forwards it from the re-tokenized text (or whatever differs)."""
    engine = tiny_engine
    session = engine.session()
    probe = engine.answer("Who was Ada?", DOCS_A, generation=GenerationConfig(max_new_tokens=8))
    stop = engine.model.tokenizer.decode(probe.token_ids[3:5])
    turn_and_fresh(engine, session, "Who was Ada?", DOCS_A, GenerationConfig(max_new_tokens=8, stop=(stop,)))
    turn_and_fresh(engine, session, "Tell me more.", DOCS_A, GenerationConfig(max_new_tokens=3))
    turn_and_fresh(engine, session, "Anything else?", DOCS_A)
    session.history = [*session.history[:-1], ChatTurn("Anything else?", "No.")]  # the application edited a turn
    edited, fresh = turn_and_fresh(engine, session, "Sure?", DOCS_A)
    assert fresh.context_tokens < edited.context_tokens and edited.forwarded_tokens < fresh.forwarded_tokens
    closed = engine.session()
    with Logits(engine) as got:
        closed.answer("Hello?", [], method="closed_book", generation=GEN)
        second = closed.answer("How are you?", [], method="closed_book", generation=GEN)
    with Logits(engine) as want:
        fresh = engine.answer("How are you?", [], method="closed_book", history=closed.history[:1], generation=GEN)
    torch.testing.assert_close(got[len(got) - len(want):], want, atol=2e-5, rtol=1e-4)
    assert second.forwarded_tokens < fresh.forwarded_tokens


def test_sessions_are_bounded_by_bytes_least_recently_used_first(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3), store=InMemoryStore())
    one, two = engine.session("one"), engine.session("two")
    one.answer("Where was Ada born?", DOCS_A, generation=GEN)
    size = engine.sessions.state("one").nbytes
    assert size > 0 and engine.sessions.stats() == {"sessions": 1, "bytes": size, "max_bytes": engine.sessions.max_bytes,
                                                     "evictions": 0}
    engine.sessions.max_bytes = int(size * 1.5)  # room for one conversation
    two.answer("Who wrote the first compiler?", DOCS_B, generation=GEN)
    assert engine.sessions.state("one") is None and engine.sessions.state("two") is not None
    assert engine.sessions.stats()["evictions"] == 1
    again, fresh = turn_and_fresh(engine, one, "When?", DOCS_A)  # rebuilt transparently
    assert again.forwarded_tokens == fresh.forwarded_tokens
    assert engine.sessions.state("two") is None
    # the same id shares the kept cache: an application keeping its conversations by id
    same = engine.session("one", history=one.history)
    reused = same.answer("And where?", DOCS_A, generation=GEN)
    assert reused.forwarded_tokens < reused.context_tokens and reused.context_tokens > fresh.context_tokens


def test_closed_early_keeps_nothing_and_reset_forgets(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3), store=InMemoryStore())
    session = engine.session()
    session.answer("Where was Ada born?", DOCS_A, generation=GEN)
    stream = session.stream("When?", DOCS_A, generation=GEN)
    next(iter(stream), None)
    stream.close()
    assert engine.sessions.state(session.id) is None and len(session.history) == 1
    turn_and_fresh(engine, session, "When?", DOCS_A)
    session.reset()
    assert session.history == [] and engine.sessions.state(session.id) is None
    with pytest.raises(EmptyInputError):
        session.stream(" ", DOCS_A)
    with pytest.raises(ValueError, match="max_bytes"):
        SessionCache(-1)


def test_concurrent_conversations_are_decoded_together(tiny_llama):
    """Turns of several sessions at once join one batch, and each equals the same conversation answered alone."""
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3), store=InMemoryStore())
    questions = (("Where was Ada born?", "When?"), ("Who designed the engine?", "Why?"), ("Who was Ada?", "And?"))
    alone = []
    for first, second in questions:
        session = engine.session()
        answers = [session.answer(q, DOCS_A, generation=GEN) for q in (first, second)]
        alone.append([(a.token_ids, a.forwarded_tokens) for a in answers])
    sessions = [engine.session() for _ in questions]
    for turn in range(2):
        streams = [s.stream(q[turn], DOCS_A, generation=GEN) for s, q in zip(sessions, questions)]
        threads = [threading.Thread(target=stream.collect) for stream in streams]
        with engine._compute:  # the loop waits until every turn is queued: they join the same forward
            for thread in threads:
                thread.start()
            deadline = time.perf_counter() + 10
            while engine.scheduler.stats()["queued"] < len(threads) and time.perf_counter() < deadline:
                time.sleep(0.002)
        for thread in threads:
            thread.join(30)
        # the same tokens, and the second turn forwards only its new message, as alone
        assert [(s.answer.token_ids, s.answer.forwarded_tokens) for s in streams] == [a[turn] for a in alone]
        assert engine.scheduler.stats()["max_batch"] == len(questions)


def test_embedded_model_forwards_exactly_the_new_tokens(default_model):
    """With the real model and chat template the cached conversation is an exact prefix of the next turn's: each
    turn forwards the end of the previous answer's turn, the new message and its template tokens, nothing else."""
    engine = PacketEngine(default_model, store=InMemoryStore())
    chunks = ["Kaito Brennan is a marathon runner born in 1994 in Sapporo, Japan. Kaito Brennan won the Lisbon "
              "Marathon in 2022. The coach of Kaito Brennan is Emiko Sato."]
    session = engine.session()
    generation = GenerationConfig(max_new_tokens=24)
    turn_and_fresh(engine, session, "Who is the coach of Kaito Brennan?", chunks, generation, atol=2e-4)
    for question in ("Where was Kaito Brennan born?", "Which marathon did he win?"):
        cached = list(engine.sessions.state(session.id).ids)
        suffix = engine.formatter.suffix_ids(question, session.history)
        reused, fresh = turn_and_fresh(engine, session, question, chunks, generation, atol=2e-4)
        assert reused.finish_reason == "stop" and suffix[: len(cached)] == cached
        assert reused.forwarded_tokens == len(suffix) - len(cached) < fresh.forwarded_tokens


def test_async_turns_equal_sync_turns_and_leave_the_loop_free(tokenizer):
    model = make_tiny_model("llama", tokenizer, tie_word_embeddings=False)
    engine = PacketEngine(model, adapter=PacketAdapter.initialize(model, 4, 4, seed=3), store=InMemoryStore())
    questions = ("Where was Ada born?", "When?", "Who designed the engine?")
    sync = engine.session()
    expected = [sync.answer(question, DOCS_A, generation=GEN) for question in questions]

    async def conversation():
        session = engine.session()
        answers = [await session.aanswer(question, DOCS_A, generation=GEN) for question in questions[:2]]
        pieces = [piece async for piece in session.astream(questions[2], DOCS_A, generation=GEN)]
        last, ticks = await ticking(session.aanswer("And then?", DOCS_A, generation=GEN))
        return answers, pieces, ticks, session

    answers, pieces, ticks, session = asyncio.run(conversation())
    for got, want in zip(answers, expected):
        assert got.token_ids == want.token_ids and got.forwarded_tokens == want.forwarded_tokens
    assert "".join(pieces) == expected[2].text and session.history[2].assistant == expected[2].text
    assert ticks > 0 and len(session.history) == 4
    with pytest.raises(EmptyInputError):
        session.astream("", DOCS_A)
