"""PacketEngine: answers, streaming, bad input, and a real run on the default model."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.errors import ContextTooLongError, EmptyInputError, IncompatiblePacketError
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.prompt import ChatTurn
from kvpacket_rag.reference import block_forward

from kvpacket_rag.testing import make_tiny_model

CHUNKS = ["Ada Lovelace was born in London.", "Alan Turing studied at Cambridge.", "Grace Hopper served in the navy."]
GREEDY8 = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> PacketEngine:
    return PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3))


def greedy_reference(engine: PacketEngine, chunks, question, steps: int, history=()) -> list[int]:
    """Greedy decoding by repeated block-mask forwards over the growing tail."""
    f = engine.formatter
    tail = f.suffix_ids(question, history)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = block_forward(engine.model, engine.adapter, f.preamble_ids(), [f.chunk_ids(c) for c in chunks],
                                   tail + out, logits_tokens=1, exact_first=engine.method.exact_first)
            out.append(int(logits[-1].argmax()))
    return out


def test_generated_tokens_equal_block_mask_greedy_decoding(engine):
    answer = engine.answer("Where was Ada Lovelace born?", CHUNKS, generation=GREEDY8)
    expected = greedy_reference(engine, CHUNKS, "Where was Ada Lovelace born?", len(answer.token_ids))
    assert answer.token_ids == expected[: len(answer.token_ids)]
    assert answer.forwarded_tokens == answer.question_tokens  # no chunk token went through the model


def test_multi_turn_history_follows_the_packets(engine):
    history = [ChatTurn("Who studied at Cambridge?", "Alan Turing.")]
    answer = engine.answer("And who served in the navy?", CHUNKS, history=history, generation=GREEDY8)
    expected = greedy_reference(engine, CHUNKS, "And who served in the navy?", len(answer.token_ids), history)
    assert answer.token_ids == expected[: len(answer.token_ids)]


def test_stream_yields_the_same_text(engine):
    stream = engine.stream("Who was in the navy?", CHUNKS, generation=GREEDY8)
    pieces = list(stream)
    assert "".join(pieces) == stream.answer.text == engine.answer("Who was in the navy?", CHUNKS, generation=GREEDY8).text


def test_the_default_method_reads_the_first_chunk_exactly_and_can_be_changed(engine, tiny_llama):
    assert engine.method.name == "kv_packet_first_exact" and engine.method.exact_first
    answer = engine.answer("Who was in the navy?", CHUNKS, generation=GREEDY8)
    named = engine.answer("Who was in the navy?", CHUNKS, method="kv_packet_first_exact", generation=GREEDY8)
    assert answer.method == "kv_packet_first_exact" and answer.token_ids == named.token_ids
    assert answer.packet_keys[0] == engine.packet_key(CHUNKS[0], "exact")
    assert answer.packet_keys[1:] == [engine.packet_key(c) for c in CHUNKS[1:]]
    plain = PacketEngine(tiny_llama, adapter=engine.adapter, method="kv_packet")
    assert plain.answer("Who?", CHUNKS, generation=GenerationConfig(2)).method == "kv_packet"
    with pytest.raises(ValueError, match="unknown method"):
        PacketEngine(tiny_llama, adapter=None, method="kv_pakcet")


def test_ingestion_builds_the_packets_the_method_reads(tiny_llama):
    first_exact = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 2, 2, seed=1))
    keys = first_exact.ingest_packets(CHUNKS)
    assert keys == [first_exact.packet_key(c) for c in CHUNKS] and first_exact.counters["packets_built"] == 6
    assert all(first_exact.store.contains(first_exact.packet_key(c, "exact")) for c in CHUNKS)
    answer = first_exact.answer("Who?", CHUNKS[::-1], generation=GenerationConfig(2))
    assert answer.packets_built == 0  # any chunk may come first: its exact packet is already stored
    adapted_only = PacketEngine(tiny_llama, adapter=first_exact.adapter, method="kv_packet")
    assert adapted_only.ingest_kinds == ["adapted"] and adapted_only.ingest_packets(CHUNKS) == keys
    assert adapted_only.counters["packets_built"] == 3


def test_packets_are_built_once_and_reused(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None)
    engine.answer("q?", CHUNKS, generation=GenerationConfig(max_new_tokens=1))
    engine.answer("another q?", CHUNKS[::-1], generation=GenerationConfig(max_new_tokens=1))
    # 3 adapter packets and the exact packets of the two chunks that came first; Turing's adapter packet reused
    assert engine.counters["packets_built"] == 5 and engine.counters["packets_loaded"] == 1
    engine.answer("a third q?", CHUNKS, generation=GenerationConfig(max_new_tokens=1))
    assert engine.counters["packets_built"] == 5 and engine.counters["packets_loaded"] == 4


def test_full_recompute_forwards_every_context_token(engine):
    answer = engine.answer("Who?", CHUNKS, method="full_recompute", generation=GenerationConfig(max_new_tokens=1))
    packet = engine.answer("Who?", CHUNKS, method="kv_packet", generation=GenerationConfig(max_new_tokens=1))
    assert answer.forwarded_tokens == answer.context_tokens + answer.question_tokens
    assert packet.context_flops < 1e-2 * answer.context_flops


def test_stop_strings_end_the_answer(engine):
    free = engine.answer("Where was Ada born?", CHUNKS, generation=GREEDY8)
    if len(free.text) < 2:
        pytest.skip("the random model produced no text to cut")
    stop = free.text[1:3]
    cut = engine.answer("Where was Ada born?", CHUNKS, generation=GenerationConfig(max_new_tokens=8, stop=(stop,)))
    assert cut.text == free.text[: free.text.find(stop)]


@pytest.mark.parametrize("question, chunks, error, message", [
    ("", CHUNKS, EmptyInputError, "question is empty"),
    ("Who?", ["fine", "   "], EmptyInputError, "chunk is empty"),
    ("Who?", ["word " * 3000], ContextTooLongError, "split the document"),
])
def test_bad_input_gets_a_clear_error(engine, question, chunks, error, message):
    with pytest.raises(error, match=message):
        engine.answer(question, chunks)


def test_total_context_beyond_the_model_is_refused(engine):
    chunks = ["word " * 500] * 5
    with pytest.raises(ContextTooLongError, match="fewer or shorter"):
        engine.answer("Who?", chunks)


def test_default_adapter_for_a_model_without_one(tiny_llama):
    with pytest.raises(IncompatiblePacketError, match="kvpacket train"):
        PacketEngine(tiny_llama, adapter="default")


def test_packets_of_another_adapter_are_never_used(tiny_llama):
    first = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=1))
    second = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=2), store=first.store)
    first.build_packets(CHUNKS)
    second.build_packets(CHUNKS)
    assert second.counters["packets_built"] == 3  # different adapter, different keys


def test_real_model_answers_without_reading_documents(default_model):
    """Five short documents on SmolLM2: only the question suffix goes through the decoder layers."""
    engine = PacketEngine(default_model, adapter="default" if _has_shipped_adapter() else None)
    docs = ["Lumen Labs was founded in 2011 in Tromsø, Norway.", "Orchard Robotics was founded by Mateo Ruiz.",
            "Harbor Bank is based in Halifax, Canada.", "Quill Press was founded in 1988 by Fiona Baird.",
            "Nimbus Air flies turboprop planes to 31 islands."]
    engine.ingest_packets(docs)
    engine.preamble_block()  # cached once per engine, like the packets
    seen: list[int] = []
    hook = default_model.model.model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs
                                                 else args[0].shape[1]), with_kwargs=True)
    try:
        answer = engine.answer("Who founded Quill Press?", docs, generation=GenerationConfig(max_new_tokens=12))
    finally:
        hook.remove()
    assert answer.text.strip()
    assert seen[0] == answer.question_tokens and all(n == 1 for n in seen[1:])
    assert answer.context_tokens > sum(len(engine.chunk_ids(d)) for d in docs)


def _has_shipped_adapter() -> bool:
    from kvpacket_rag.adapter import SHIPPED_ADAPTERS
    from kvpacket_rag.models import DEFAULT_MODEL

    return SHIPPED_ADAPTERS[DEFAULT_MODEL].is_file()


def test_plain_chat_equals_greedy_decoding_of_the_whole_prompt(engine):
    messages = [("system", "Be brief."), ("user", "Where was Ada Lovelace born?")]
    answer = engine.chat(messages, GREEDY8).collect()
    ids = engine.formatter.chat_ids(messages)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(len(answer.token_ids)):
            logits = engine.model.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    assert answer.token_ids == out
    assert (answer.method, answer.context_tokens, answer.question_tokens) == ("plain", 0, len(ids))
    assert answer.packet_keys == [] and answer.timings["ttft_s"] > 0
    with pytest.raises(EmptyInputError):
        engine.chat([("user", "  ")])


def test_finish_reason_says_whether_the_token_budget_cut_the_answer(engine):
    cut = engine.answer("Who was in the navy?", CHUNKS, generation=GenerationConfig(max_new_tokens=2))
    assert len(cut.token_ids) < 2 or cut.finish_reason == "length"
    full = engine.answer("Who was in the navy?", CHUNKS, generation=GREEDY8).text.strip()
    if full:
        stopped = engine.answer("Who was in the navy?", CHUNKS, generation=GenerationConfig(8, stop=(full[0],)))
        assert stopped.finish_reason == "stop"


def test_packets_built_during_a_call_are_counted(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 2, 2, seed=1))
    first = engine.answer("Who was in the navy?", CHUNKS, generation=GenerationConfig(2))
    assert first.packets_built == 3 and first.tokens_built == sum(len(engine.chunk_ids(c)) for c in CHUNKS)
    again = engine.answer("Who was in the navy?", CHUNKS, generation=GenerationConfig(2), method="cacheblend:0.5")
    assert again.packets_built == 3  # bare packets: another kind
    assert engine.answer("Who?", CHUNKS, generation=GenerationConfig(2)).packets_built == 0
