"""The method registry: names, parameters, and the packets each method declares it reads."""

from __future__ import annotations

import pytest

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.baselines import CacheBlend, Epic
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.methods import METHODS, ClosedBook, FullRecompute, PacketMethod, get_method

CHUNKS = ["Ada Lovelace was born in London.", "Alan Turing studied at Cambridge."]


def test_fetch_packets_builds_what_each_method_reads_once(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 2, 2, seed=1))
    names = ("kv_packet_first_exact", "cacheblend:0.15", "kv_packet", "epic:4", "full_recompute")
    built = [get_method(n).fetch_packets(engine, CHUNKS) for n in names]
    assert [len(b.keys) for b in built] == [2, 2, 2, 2, 0]
    assert [b.built for b in built] == [2, 2, 1, 0, 0]  # kv_packet: the first chunk's adapted packet only
    assert built[0].keys == [engine.packet_key(CHUNKS[0], "exact"), engine.packet_key(CHUNKS[1])]
    assert set(built[2].built_keys) == {engine.packet_key(CHUNKS[0])} and engine.counters["packets_built"] == 5
    answer = engine.answer("Where was Ada born?", CHUNKS, generation=GenerationConfig(max_new_tokens=1))
    assert answer.packets_built == 0 and answer.packet_keys == built[0].keys


def test_registry_names_every_method_with_its_packet_kinds():
    assert set(METHODS) == {"kv_packet", "kv_packet_first_exact", "no_recompute", "full_recompute", "closed_book",
                            "cacheblend", "epic", "kv_packet_refresh"}
    assert get_method("kv_packet").packet_kinds == ("adapted",)
    assert get_method("kv_packet_first_exact").packet_kinds == ("exact", "adapted")
    assert get_method("no_recompute").packet_kinds == ("bare",)
    assert isinstance(get_method("cacheblend:0.2"), CacheBlend) and get_method("cacheblend:0.2").packet_kinds == ("bare",)
    assert isinstance(get_method("epic:4"), Epic) and get_method("epic:4").name == "epic:4"
    assert get_method("kv_packet_refresh:4").packet_kinds == ("exact", "adapted")
    assert isinstance(get_method("full_recompute"), FullRecompute) and FullRecompute.packet_kinds == ()
    assert isinstance(get_method("closed_book"), ClosedBook) and ClosedBook.packet_kinds == ()
    method = PacketMethod(name="mine")
    assert get_method(method) is method
    with pytest.raises(ValueError, match="choose one of"):
        get_method("kv_link_typo")
    with pytest.raises(ValueError, match="takes no parameter"):
        get_method("kv_packet:3")
    with pytest.raises(ValueError, match="cacheblend:0.15"):
        get_method("cacheblend:lots")


def test_a_method_with_its_own_adapter_reads_that_adapters_packets(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None)
    adapter = PacketAdapter.initialize(tiny_llama, 2, 2, seed=4)
    method = PacketMethod(adapter=adapter, name="kv_packet@mine")
    assert method.packet_kinds == (adapter,)
    keys = engine.build_packets(CHUNKS, adapter)
    assert keys == [engine.packet_key(c, adapter) for c in CHUNKS] != engine.build_packets(CHUNKS)
    answer = engine.answer("Where was Ada born?", CHUNKS, method=method, generation=GenerationConfig(2))
    assert answer.packet_keys == keys and answer.packets_built == 0
    assert engine.builder_for(adapter) is engine.builder_for(adapter)
    with pytest.raises(ValueError, match="packet kind"):
        engine.builder_for("adapter")


def test_first_exact_reads_the_first_chunks_exact_packet_and_the_others_adapted(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 2, 2, seed=4, prefix="preamble"))
    chunks = [*CHUNKS, "Grace Hopper wrote a compiler."]
    answer = engine.answer("Where was Ada born?", chunks, method="kv_packet_first_exact", generation=GenerationConfig(2))
    assert answer.packet_keys == [engine.packet_key(chunks[0], "exact"),
                                  *(engine.packet_key(c) for c in chunks[1:])]
    assert answer.packets_built == 3
    assert engine.packet_key(chunks[0], "exact") not in (engine.packet_key(chunks[0]), engine.packet_key(chunks[0], "bare"))
    again = engine.answer("Where was Ada born?", chunks, method="kv_packet_first_exact", generation=GenerationConfig(2))
    assert again.packets_built == 0 and again.text == answer.text
    nothing = engine.answer("Where was Ada born?", [], method="kv_packet_first_exact", generation=GenerationConfig(2))
    assert nothing.packet_keys == []
