"""Calibration contexts: drawing them, calibrating an adapter, and `kvpacket calibrate` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.calibration import CalibrationConfig, NeighbourContexts, calibrate, draw_contexts
from kvpacket_rag.embedder import Embedder
from kvpacket_rag.cli import main
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.errors import InvalidInputError
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.models import load_model
from kvpacket_rag.prompt import PromptFormatter

PASSAGES = [f"Item {i} is a {colour} box of {i} kg." for i, colour in enumerate(["red", "blue", "green", "grey"])]


def test_contexts_join_distinct_passages_and_are_seeded():
    passages = [[1, 2], [3], [4, 5, 6], []]
    contexts = draw_contexts(passages, CalibrationConfig(contexts=5, depth=2, seed=3))
    assert len(contexts) == 5 and contexts == draw_contexts(passages, CalibrationConfig(contexts=5, depth=2, seed=3))
    pieces = {(1, 2), (3,), (4, 5, 6)}
    for ids in contexts:  # two different non-empty passages, in some order
        assert any(tuple(ids[:n]) in pieces and tuple(ids[n:]) in pieces and ids[:n] != ids[n:]
                   for n in range(1, len(ids)))
    with pytest.raises(InvalidInputError, match="at least 4 non-empty passages"):
        draw_contexts(passages, CalibrationConfig(depth=4))


@pytest.mark.parametrize("field, value", [("contexts", 0), ("depth", 0), ("depth", 1.5), ("neighbours", 1),
                                          ("neighbours", 2.0)])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=f"calibration {field}"):
        CalibrationConfig(**{field: value})


def test_defaults_are_four_contexts_of_two_passages_shared_and_four_of_four_by_place_from_neighbours():
    assert (CalibrationConfig().contexts, CalibrationConfig().depth) == (4, 2)
    assert (CalibrationConfig(neighbours=8).contexts, CalibrationConfig(neighbours=8).depth) == (4, 4)
    assert CalibrationConfig(depth=3, neighbours=8) == CalibrationConfig(4, 3, 0, 8, by_place=True)
    assert not CalibrationConfig().by_place and not CalibrationConfig(neighbours=8, by_place=False).by_place
    with pytest.raises(ValueError, match=r"neighbours must be 0 or an int >= depth \(4\)"):
        CalibrationConfig(neighbours=2)


def test_calibrate_keeps_the_adapter_and_records_its_draw(tiny_llama):
    formatter = PromptFormatter(tiny_llama.tokenizer)
    base = PacketAdapter.initialize(tiny_llama, 2, 2, seed=1, prefix="preamble")
    calibrated = calibrate(base, formatter, PASSAGES + ["  "], CalibrationConfig(contexts=3, depth=2), source="test")
    assert len(calibrated.calibration) == 3 and calibrated.n_header == 2
    tokens = {tuple(formatter.chunk_ids(text)) for text in PASSAGES}
    assert all(any(tuple(ids[:n]) in tokens for n in range(1, len(ids))) for ids in calibrated.calibration)
    assert calibrated.card["calibrated_from"] == base.fingerprint
    assert calibrated.card["calibration"] == {"contexts": 3, "depth": 2, "seed": 0, "neighbours": 0, "by_place": False,
                                              "passages": 4, "source": "test"}
    packet = PacketBuilder(tiny_llama, calibrated, formatter).build("Item 9 is a white box.")
    assert packet.adapter_fingerprint.startswith(calibrated.fingerprint)


def test_kvpacket_calibrate_writes_an_adapter(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"chunks": [text], "question": "Which item?"}) for text in PASSAGES) + "\n")
    out = tmp_path / "calibrated.safetensors"
    status = main(["calibrate", "--model", str(model_dir), "--dataset", f"jsonl:{data}", "--n", "4",
                   "--contexts", "2", "--depth", "3", "--out", str(out)])
    assert status == 0 and "2 contexts of 3 passages from 4 passages" in capsys.readouterr().out
    adapter = PacketAdapter.load(out, load_model(str(model_dir)))
    assert len(adapter.calibration) == 2 and adapter.prefix == "preamble" and adapter.n_header == 0
    assert main(["calibrate", "--model", str(model_dir), "--dataset", f"jsonl:{data}", "--n", "4", "--depth", "5",
                 "--out", str(tmp_path / "x.safetensors")]) == 3
    assert "at least 5 non-empty passages" in capsys.readouterr().err


# ---- neighbour contexts: each chunk's contexts from its nearest passages ----------------------------------------

TOPICS = ["The violin has four strings and is played with a bow.",
          "The cello is a large string instrument played with a bow.",
          "Basalt is a volcanic rock formed from cooling lava.",
          "Granite is an igneous rock made of quartz and feldspar.",
          "Sourdough bread rises with wild yeast and bacteria."]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def neighbours_of(model, embedder, **config):
    formatter = PromptFormatter(model.tokenizer)
    return NeighbourContexts(TOPICS + ["", TOPICS[0]], formatter, embedder, CalibrationConfig(**config)), formatter


def test_nearest_passages_exclude_the_chunk_and_rank_by_similarity(tiny_llama, embedder):
    near, formatter = neighbours_of(tiny_llama, embedder, contexts=3, depth=1, neighbours=2)
    assert len(near.passages) == 5  # the blank and the repeated passage are skipped
    ids = formatter.chunk_ids(TOPICS[0])
    nearest = near.nearest(ids)
    assert nearest[0] == formatter.chunk_ids(TOPICS[1]) and ids not in nearest and len(nearest) == 2
    outside = formatter.chunk_ids("A viola is a string instrument slightly larger than a violin.")
    assert near.nearest(outside)[0] in (formatter.chunk_ids(TOPICS[0]), formatter.chunk_ids(TOPICS[1]))
    contexts = near.contexts_for(ids)
    assert len(contexts) == 3 and all(c in nearest for c in contexts) and contexts == near.contexts_for(ids)


def test_nearest_rows_of_a_corpus_are_ranked_as_one_product_per_row_would_rank_them():
    from kvpacket_rag.calibration import _top_k_others

    vectors = np.random.default_rng(0).standard_normal((37, 8)).astype(np.float32)
    vectors[5] = vectors[3]  # an equal score: the earlier row first
    expected = []
    for row, vector in enumerate(vectors):
        scores = vectors @ vector
        scores[row] = -np.inf
        expected.append(np.argsort(-scores, kind="stable")[:6])
    for block_floats in (37, 100, 1 << 24):  # one row, a few rows, every row per block
        assert np.array_equal(_top_k_others(vectors, 6, block_floats), np.array(expected))


def test_neighbour_contexts_are_refused_without_neighbours_or_corpus(tiny_llama, embedder):
    formatter = PromptFormatter(tiny_llama.tokenizer)
    with pytest.raises(ValueError, match="neighbours >= depth"):
        NeighbourContexts(TOPICS, formatter, embedder, CalibrationConfig())
    with pytest.raises(InvalidInputError, match="at least 2 distinct"):
        NeighbourContexts([TOPICS[0], TOPICS[0], " "], formatter, embedder, CalibrationConfig(depth=2, neighbours=2))
    with pytest.raises(ValueError, match="NeighbourContexts"):
        calibrate(PacketAdapter.empty(tiny_llama, "preamble"), formatter, TOPICS, CalibrationConfig(neighbours=8))


def test_neighbour_packet_equals_the_adapter_calibrated_with_the_same_context(tiny_model, embedder):
    """A chunk built after its nearest passage is the packet of an adapter calibrated with that one context
    (whose exactness against the block-mask forward is checked with the other calibrated packets)."""
    near, formatter = neighbours_of(tiny_model, embedder, contexts=1, depth=1, neighbours=1)
    adapter = PacketAdapter.initialize(tiny_model, 2, 2, seed=0, prefix="preamble")
    ids = formatter.chunk_ids(TOPICS[2])
    packet = PacketBuilder(tiny_model, adapter, formatter, neighbours=near).build(ids)
    single = adapter.with_calibration([formatter.chunk_ids(TOPICS[3])], {})
    expected = PacketBuilder(tiny_model, single, formatter).build(ids)
    torch.testing.assert_close(packet.keys, expected.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packet.values, expected.values, rtol=1e-5, atol=1e-5)


def test_neighbour_packets_are_keyed_by_their_own_contexts(tiny_llama, embedder):
    """A packet's key covers the contexts it was built after: another corpus in which the chunk's nearest passages
    are the same gives the same packet; a nearer passage gives another."""
    formatter = PromptFormatter(tiny_llama.tokenizer)
    config = CalibrationConfig(contexts=1, depth=1, neighbours=1)
    adapter = PacketAdapter.empty(tiny_llama, "preamble")
    ids = formatter.chunk_ids(TOPICS[0])

    def builder_in(corpus):
        return PacketBuilder(tiny_llama, adapter, formatter,
                             neighbours=NeighbourContexts(corpus, formatter, embedder, config))

    def key_in(corpus):
        return builder_in(corpus).key_for(ids)

    assert key_in(TOPICS) == key_in(TOPICS[:2] + TOPICS[4:])  # the cello stays the violin's nearest passage
    assert key_in(TOPICS) != key_in(TOPICS + ["The violin, also called a fiddle, has four strings tuned in fifths."])
    assert key_in(TOPICS) != PacketBuilder(tiny_llama, adapter, formatter).key_for(ids)
    builder = builder_in(TOPICS)
    packet = builder.build(ids)
    assert packet.key == builder.key_for(ids) and packet.adapter_fingerprint == builder.provenance_for(ids)
    with pytest.raises(ValueError, match="already carries calibration"):
        PacketBuilder(tiny_llama, adapter.with_calibration([ids], {}), formatter, neighbours=builder.neighbours)


def test_engine_builds_with_neighbour_contexts_then_as_before(tiny_llama, embedder):
    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    near, _ = neighbours_of(tiny_llama, embedder, contexts=2, depth=1, neighbours=2)
    plain_key = engine.packet_key(TOPICS[0], "adapted")
    engine.calibrate_on(near)
    key = engine.build_packets([TOPICS[0]])[0]
    assert key != plain_key and engine.store.contains(key)
    assert engine.answer("What has four strings?", TOPICS[:2]).text is not None
    engine.calibrate_on(None)
    assert engine.packet_key(TOPICS[0], "adapted") == plain_key


# ---- by place: each chunk's packet for its place among the retrieved chunks --------------------------------------

def test_contexts_at_a_depth_are_the_last_passages_of_each_drawn_context(tiny_llama, embedder):
    near, formatter = neighbours_of(tiny_llama, embedder, contexts=2, depth=3, neighbours=3)
    ids = formatter.chunk_ids(TOPICS[0])
    passages = {tuple(p) for p in near.nearest(ids)}
    full = near.contexts_for(ids)
    assert near.at_depth(3).contexts_for(ids) == full and near.at_depth(0).contexts_for(ids) == [[], []]
    for depth in (1, 2):
        cut = near.at_depth(depth).contexts_for(ids)
        assert all(context[len(context) - len(c):] == c for context, c in zip(full, cut))
        assert all(any(list(a) + list(b) == c for a in passages for b in passages if a != b) for c in cut) \
            if depth == 2 else all(tuple(c) in passages for c in cut)
    digests = {near.at_depth(depth).digest(ids) for depth in (1, 2, 3)}
    assert len(digests) == 3 and near.at_depth(3).digest(ids) == near.digest(ids) and near.depth == 3
    with pytest.raises(ValueError, match="0..3"):
        near.at_depth(4)
    by_place = NeighbourContexts(TOPICS, formatter, embedder, CalibrationConfig(2, 3, neighbours=3, by_place=True))
    assert by_place.fingerprint == NeighbourContexts(TOPICS, formatter, embedder,
                                                     CalibrationConfig(2, 3, neighbours=3, by_place=False)).fingerprint
    with pytest.raises(ValueError, match="set neighbours"):
        CalibrationConfig(by_place=True)


def test_engine_reads_each_chunk_at_its_place(tiny_llama, embedder):
    """By place: the chunk at place p reads the packet built after min(p, depth) passages of its contexts; at
    place 0 the one built after none (with bare packets, the exact packet's tensors); ingestion builds each place's
    packet once."""
    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    formatter = engine.formatter
    near = NeighbourContexts(TOPICS, formatter, embedder, CalibrationConfig(1, 2, neighbours=2, by_place=True))
    engine.calibrate_on(near)

    def key(text, depth):
        neighbours = near.at_depth(depth) if depth else None
        return PacketBuilder(tiny_llama, engine.adapter, formatter, neighbours=neighbours).key_for(
            formatter.chunk_ids(text))

    chunks = TOPICS[:4]
    answer = engine.answer("What has four strings?", chunks, method="kv_packet")
    assert answer.packet_keys == [key(chunks[0], 0), key(chunks[1], 1), key(chunks[2], 2), key(chunks[3], 2)]
    assert answer.packet_keys[2] == engine.packet_key(chunks[2]) and len(set(answer.packet_keys)) == 4
    exact = engine.store.get(engine.packet_key(chunks[0], "exact")) or engine.exact_builder.build(chunks[0])
    assert torch.equal(engine.store.get(answer.packet_keys[0]).keys, exact.keys)
    default = engine.answer("What has four strings?", chunks)  # the default reading: the first chunk exact
    assert default.packet_keys == [engine.packet_key(chunks[0], "exact"), *answer.packet_keys[1:]]
    built = engine.counters["packets_built"]
    engine.ingest_packets([TOPICS[4]])  # exact, place 1, place 2 (the first place reads the exact packet)
    assert engine.counters["packets_built"] - built == len(engine.ingest_builders) == 3
    engine.calibrate_on(None)
    assert engine.ingest_builders[-1] is engine.builder and len(engine.ingest_builders) == 2


def test_by_place_index_builds_every_place_and_reopens_without_building(tiny_llama, embedder, tmp_path):
    from kvpacket_rag.index import Document, PacketIndex
    from kvpacket_rag.store import LocalStore

    calibration = CalibrationConfig(1, 2, neighbours=2, by_place=True)
    engine = PacketEngine(tiny_llama, adapter="none+preamble", store=LocalStore(tmp_path / "packets"))
    index = PacketIndex(engine, embedder, calibration=calibration)
    report = index.add_documents([Document(text, f"doc{n}") for n, text in enumerate(TOPICS)])
    assert report.packets_built == len(TOPICS) * 3  # exact, place 1, place 2
    index.save(tmp_path / "index")
    fresh = PacketEngine(tiny_llama, adapter="none+preamble", store=LocalStore(tmp_path / "packets"))
    reopened = PacketIndex.open(tmp_path / "index", fresh, embedder, missing_packets="error")
    assert reopened.calibration == calibration
    answer = reopened.answer("What has four strings?", k=3)
    assert answer.packets_built == 0 and fresh.counters["packets_built"] == 0


def test_refresh_over_by_place_packets_is_exact_at_its_extremes(tiny_model, embedder):
    """kv_packet_refresh over by-place packets: K = 0 reads as kv_packet (the first place's packet is the exact
    one), every token recomputed is full recompute."""
    from kvpacket_rag.evaluation.teacher import continuation_logprobs

    engine = PacketEngine(tiny_model, adapter="none+preamble")
    engine.calibrate_on(NeighbourContexts(TOPICS, engine.formatter, embedder,
                                          CalibrationConfig(1, 2, neighbours=2, by_place=True)))
    logprobs = lambda method: continuation_logprobs(engine, method, "What has four strings?", TOPICS[:3], [5, 9, 7])
    torch.testing.assert_close(logprobs("kv_packet_refresh:0"), logprobs("kv_packet"), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logprobs("kv_packet_refresh:1000"), logprobs("full_recompute"), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logprobs("kv_packet_refresh:2"), logprobs("kv_packet"), atol=1e-6)


def test_answering_makes_sure_of_the_packet_each_chunk_is_read_from_at_its_place(tiny_llama, embedder):
    """With by-place packets a chunk is read from its place's packet: an absent one is reported under
    missing='error' (not built behind the caller's back) and built under 'build'."""
    from kvpacket_rag.errors import PacketNotFoundError
    from kvpacket_rag.rag import stream_answer

    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    engine.calibrate_on(NeighbourContexts(TOPICS, engine.formatter, embedder,
                                          CalibrationConfig(1, 2, neighbours=2, by_place=True)))
    chunks = TOPICS[:2]
    keys = engine.build_packets(chunks)  # the deepest place's packets, as a one-packet ingestion recorded them
    with pytest.raises(PacketNotFoundError, match="2 of the 4 packets"):  # place 0 (exact) and place 1 are absent
        stream_answer(engine, "What has four strings?", chunks, recorded_keys=keys, missing="error",
                      method="kv_packet")
    answer = stream_answer(engine, "What has four strings?", chunks, recorded_keys=keys, method="kv_packet",
                           generation=GenerationConfig(max_new_tokens=2)).collect()
    assert answer.packets_built == 2 and answer.answer.packet_keys == engine.packet_keys_for(chunks, first_place=0)
    again = stream_answer(engine, "What has four strings?", chunks + chunks[:1], recorded_keys=keys + keys[:1],
                          missing="error", method="kv_packet", generation=GenerationConfig(max_new_tokens=2))
    assert again.collect().packets_built == 0  # the first chunk read again at place 2: the deepest packet, stored


def test_calibration_arguments_spell_out_by_place():
    import argparse

    from kvpacket_rag.cli.common import add_calibration_arguments, calibration_config, calibration_flags

    parser = argparse.ArgumentParser()
    add_calibration_arguments(parser, "the corpus")
    args = parser.parse_args(["--calibrate-neighbours", "8", "--calibration-depth", "2", "--calibrate-by-place"])
    assert calibration_config(args) == CalibrationConfig(4, 2, neighbours=8, by_place=True)
    assert calibration_flags(args) == ["--calibrate-neighbours", "8", "--calibration-contexts", "4",
                                       "--calibration-depth", "2", "--calibrate-by-place"]
    with pytest.raises(ValueError, match="needs --calibrate-neighbours"):
        calibration_config(parser.parse_args(["--calibrate-by-place"]))
    assert calibration_config(parser.parse_args(["--calibrate-neighbours", "8"])).by_place  # the default
    once = parser.parse_args(["--calibrate-neighbours", "8", "--no-calibrate-by-place"])
    assert calibration_config(once) == CalibrationConfig(neighbours=8, by_place=False)
    assert calibration_flags(once)[-1] == "--no-calibrate-by-place"
    assert calibration_config(parser.parse_args([])) is None
    # a command that knows its top-k builds places up to top-k - 1 unless a depth is given
    assert calibration_config(parser.parse_args(["--calibrate-neighbours", "8"]), places=3).depth == 2
    assert calibration_config(parser.parse_args(["--calibrate-neighbours", "8"]), places=1).depth == 1
    assert calibration_config(args, places=6).depth == 2


def test_index_saved_before_by_place_reopens_with_one_packet_per_chunk(tiny_llama, embedder, tmp_path):
    import json

    from kvpacket_rag.index import Document, PacketIndex
    from kvpacket_rag.index_files import MANIFEST

    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    index = PacketIndex(engine, embedder, calibration=CalibrationConfig(1, 2, neighbours=2, by_place=False))
    index.add_documents([Document(text, f"doc{n}") for n, text in enumerate(TOPICS)])
    index.save(tmp_path / "index")
    manifest_path = tmp_path / "index" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["calibration"]["by_place"]
    manifest_path.write_text(json.dumps(manifest))
    reopened = PacketIndex.open(tmp_path / "index", engine, embedder, missing_packets="error")
    assert reopened.calibration == CalibrationConfig(1, 2, neighbours=2, by_place=False)


def test_neighbour_contexts_too_long_for_the_model_are_cut_from_their_start(tiny_llama, embedder):
    """Contexts that would push the chunk past the model's positions lose their first tokens, never the chunk."""
    formatter = PromptFormatter(tiny_llama.tokenizer)
    long_passages = [" ".join([topic] * 100) for topic in TOPICS[:3]]  # each over half of the 2048 positions
    near = NeighbourContexts(long_passages, formatter, embedder, CalibrationConfig(contexts=1, depth=2, neighbours=2))
    adapter = PacketAdapter.empty(tiny_llama, "preamble")
    ids = formatter.chunk_ids(TOPICS[4])
    context = near.contexts_for(ids)[0]
    room = tiny_llama.max_positions - len(formatter.preamble_ids()) - len(ids)
    assert len(context) > room
    packet = PacketBuilder(tiny_llama, adapter, formatter, neighbours=near).build(ids)
    expected = PacketBuilder(tiny_llama, adapter.with_calibration([context[len(context) - room:]], {}),
                             formatter).build(ids)
    torch.testing.assert_close(packet.keys, expected.keys, rtol=1e-5, atol=1e-5)
