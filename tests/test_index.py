"""PacketIndex on the real default model + MiniLM + FAISS: ingestion, search, answers, persistence, bad input."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvpacket_rag import GenerationConfig, PacketAdapter, PacketEngine  # noqa: E402
from kvpacket_rag.chunker import ChunkerConfig  # noqa: E402
from kvpacket_rag.embedder import Embedder  # noqa: E402
from kvpacket_rag.adapter import SHIPPED_ADAPTERS  # noqa: E402
from kvpacket_rag.errors import EmptyInputError, IncompatiblePacketError, KVPacketError, PacketNotFoundError  # noqa: E402
from kvpacket_rag.index import DuplicateDocumentError, Document, IndexMismatchError, PacketIndex  # noqa: E402
from kvpacket_rag.rag import MissingPacketKeyError, ensure_packets, stream_answer  # noqa: E402
from kvpacket_rag.prompt import ChatTurn  # noqa: E402
from kvpacket_rag.store import InMemoryStore  # noqa: E402

CORPUS = {
    "quill": "Quill Press is an independent publisher in Edinburgh, Scotland. It was founded in 1988 by the poet "
             "Fiona Baird. Quill Press publishes about forty books a year.",
    "nimbus": "Nimbus Air is a regional airline headquartered in Cebu, the Philippines. It flies turboprop planes to "
              "31 islands. Nimbus Air was founded in 2004 by Daniel Reyes.",
    "lumen": "Lumen Labs is a battery company founded in 2011 in Tromso, Norway. Its chief executive is Ingrid "
             "Solberg. Lumen Labs makes sodium-ion batteries for ferries.",
}
GEN = GenerationConfig(max_new_tokens=8)


def _adapter(model):
    return "default" if SHIPPED_ADAPTERS.get(model.name, None) is not None and SHIPPED_ADAPTERS[model.name].is_file() \
        else PacketAdapter.initialize(model, seed=0)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def engine(default_model) -> PacketEngine:
    return PacketEngine(default_model, adapter=_adapter(default_model), store=InMemoryStore())


@pytest.fixture
def index(engine, embedder) -> PacketIndex:
    index = PacketIndex(engine, embedder)
    index.add_documents([Document(text, doc_id, {"source": doc_id}) for doc_id, text in CORPUS.items()])
    return index


def test_ingest_search_and_content_addressed_packets(engine, embedder):
    engine.store = InMemoryStore()
    index = PacketIndex(engine, embedder, ChunkerConfig(chunk_tokens=24))
    built = engine.counters["packets_built"]
    report = index.add_documents([Document(text, doc_id, {"source": doc_id}) for doc_id, text in CORPUS.items()])
    assert report.documents == 3 and len(report.chunks) > 3  # 24-token chunks split each document
    # every chunk gets its adapter packet and its exact packet (it may be retrieved first)
    assert report.packets_built == 2 * len(report.chunks) == engine.counters["packets_built"] - built
    assert all(engine.store.contains(engine.packet_key(r.text, "exact")) for r in report.chunks)
    assert all(engine.store.contains(r.packet_key) for r in report.chunks)
    hits = index.search("Who founded Quill Press?", k=3)
    assert hits[0].chunk.doc_id == "quill" and hits[0].chunk.metadata == {"source": "quill"}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert index.search("Which airline flies to islands?", k=1)[0].chunk.doc_id == "nimbus"
    # same text again: skipped under the same id; under a new id it is indexed but no packet is built
    again = index.add_documents([Document(CORPUS["quill"], "quill"), Document(CORPUS["quill"], "quill-copy")])
    assert again.skipped == ["quill"] and again.packets_built == 0 and again.packets_reused == 2 * len(again.chunks) > 0
    # duplicate chunks never fill the context twice
    keys = [h.packet_key for h in index.search("Quill Press founder", k=6)]
    assert len(keys) == len(set(keys))
    # later documents build only their own packets
    later = index.add_documents(["Harbor Bank is a cooperative bank in Halifax, Canada, founded in 1952."])
    assert later.packets_built == 2 * len(later.chunks) == 2
    with pytest.raises(DuplicateDocumentError, match="delete_document"):
        index.add_documents([Document("Quill Press moved to Glasgow.", "quill")])
    assert index.delete_document("quill-copy") == len(again.chunks) and index.delete_document("nope") == 0
    assert all(h.chunk.doc_id != "quill-copy" for h in index.search("Quill Press founder", k=10))


def test_answer_equals_engine_over_retrieved_chunks_and_streams_the_same(index, engine):
    question = "Who founded Quill Press?"
    result = index.answer(question, k=2, generation=GEN)
    texts = [h.text for h in result.sources]
    assert result.sources[0].chunk.doc_id == "quill" and not result.closed_book
    direct = engine.answer(question, texts, generation=GEN)
    assert result.text == direct.text and result.answer.token_ids == direct.token_ids
    exact = engine.packet_key(result.sources[0].text, "exact")  # the first chunk is read from its exact packet
    assert result.packet_keys == [exact] + [h.packet_key for h in result.sources[1:]]
    assert result.timings["ttft_s"] >= result.timings["engine_ttft_s"] and result.timings["retrieval_s"] > 0
    stream = index.stream(question, k=2, generation=GEN)
    assert [h.packet_key for h in stream.sources] == [h.packet_key for h in result.sources]
    assert "".join(stream) == result.text == stream.result.text and stream.result.packet_keys == result.packet_keys


def test_follow_up_turns_reuse_packets(index, engine):
    first = index.answer("Who founded Nimbus Air?", k=2, generation=GEN)
    built = engine.counters["packets_built"]
    follow = index.answer("And where is it headquartered?", k=2, generation=GEN,
                          history=[ChatTurn("Who founded Nimbus Air?", first.text)])
    assert engine.counters["packets_built"] == built
    direct = engine.answer("And where is it headquartered?", [h.text for h in follow.sources], generation=GEN,
                           history=[ChatTurn("Who founded Nimbus Air?", first.text)])
    assert follow.text == direct.text


def test_empty_retrieval_answers_closed_book(index, engine, embedder):
    result = index.answer("Who founded Quill Press?", k=2, generation=GEN, min_score=1.01)
    assert result.closed_book and result.sources == [] and result.answer.method == "closed_book"
    assert result.metadata()["closed_book"] is True
    assert result.text == engine.answer("Who founded Quill Press?", [], method="closed_book", generation=GEN).text
    empty = PacketIndex(engine, embedder)
    assert empty.search("anything", k=3) == []
    assert empty.answer("Who founded Quill Press?", generation=GEN).closed_book
    with pytest.raises(EmptyInputError):
        index.answer("  ")
    with pytest.raises(EmptyInputError):
        index.add_documents(["fine", " "])


def test_save_and_open_without_rebuilding(index, engine, embedder, tmp_path):
    index.save(tmp_path / "idx")
    built = engine.counters["packets_built"]
    reopened = PacketIndex.open(tmp_path / "idx", engine, embedder, missing_packets="error")
    assert engine.counters["packets_built"] == built
    question = "Which company makes sodium-ion batteries?"
    assert [h.chunk for h in reopened.search(question, 3)] == [h.chunk for h in index.search(question, 3)]
    assert reopened.answer(question, 2, generation=GEN).text == index.answer(question, 2, generation=GEN).text
    report = reopened.add_documents(["Orchard Robotics builds fruit-picking robots in Valencia."])
    assert report.packets_built == 2 and len({r.chunk_id for r in reopened.records.values()}) == 4


def test_open_refuses_another_model_adapter_or_embedder(index, engine, embedder, tmp_path):
    path = index.save(tmp_path / "idx")
    other_adapter = PacketEngine(engine.model, adapter=PacketAdapter.initialize(engine.model, seed=7), store=engine.store)
    with pytest.raises(IndexMismatchError, match="rebuild_packets=True"):
        PacketIndex.open(path, other_adapter, embedder)
    rebuilt = PacketIndex.open(path, other_adapter, embedder, rebuild_packets=True)
    assert other_adapter.counters["packets_built"] == 3
    assert set(rebuilt.packet_keys()).isdisjoint(index.packet_keys())
    other_embedder = Embedder(embedder.model, name="another-embedder")
    with pytest.raises(IndexMismatchError, match="same embedder"):
        PacketIndex.open(path, engine, other_embedder)
    fresh_store = PacketEngine(engine.model, adapter=engine.adapter, store=InMemoryStore())
    with pytest.raises(PacketNotFoundError, match="missing_packets='build'"):
        PacketIndex.open(path, fresh_store, embedder, missing_packets="error")
    PacketIndex.open(path, fresh_store, embedder)
    assert fresh_store.counters["packets_built"] == 6  # adapter and exact packets
    next(path.glob("chunks.*.jsonl")).write_text("{}\n")
    with pytest.raises(KVPacketError, match="checksum"):
        PacketIndex.open(path, engine, embedder)
    with pytest.raises(FileNotFoundError, match="no saved PacketIndex"):
        PacketIndex.open(tmp_path / "nothing", engine, embedder)


def test_retrieved_chunks_with_bad_packet_keys(index, engine):
    texts = [CORPUS["quill"], "A chunk that was never ingested."]
    good = engine.packet_key(texts[0])
    with pytest.raises(MissingPacketKeyError, match="ingestion"):
        ensure_packets(engine, texts, [good, None], missing="error")
    stale = PacketEngine(engine.model, adapter=PacketAdapter.initialize(engine.model, seed=9), store=InMemoryStore())
    with pytest.raises(IncompatiblePacketError, match="another model or adapter"):
        ensure_packets(stale, texts[:1], [good])
    new_key = engine.packet_key(texts[1])
    with pytest.raises(PacketNotFoundError, match="not in the store"):
        ensure_packets(engine, texts, [good, new_key], missing="error")
    built = engine.counters["packets_built"]
    assert ensure_packets(engine, texts, [good, None]) == [good, new_key]
    assert engine.counters["packets_built"] == built + 1 and engine.store.contains(new_key)


def test_a_missing_exact_packet_of_the_first_chunk_is_built_or_reported(engine):
    texts = [CORPUS["quill"], CORPUS["lumen"]]
    older = PacketEngine(engine.model, adapter=engine.adapter, store=InMemoryStore())
    keys = older.build_packets(texts)  # adapter packets only, as an ingestion for kv_packet stores them
    with pytest.raises(PacketNotFoundError, match="1 of the 3 packets"):
        stream_answer(older, "Who founded Quill Press?", texts, recorded_keys=keys, missing="error")
    answer = stream_answer(older, "Who founded Quill Press?", texts, recorded_keys=keys, generation=GEN).collect()
    assert answer.packets_built == 1 and older.store.contains(older.packet_key(texts[0], "exact"))
    again = stream_answer(older, "Who founded Quill Press?", texts, recorded_keys=keys, missing="error",
                          generation=GEN).collect()
    assert again.text == answer.text and again.packets_built == 0


def test_reopening_over_a_persistent_store_builds_nothing(default_model, embedder, tmp_path):
    store_module = pytest.importorskip("kvpacket_rag.store")
    if not hasattr(store_module, "open_store"):
        pytest.skip("no persistent store in this build")
    first = PacketEngine(default_model, adapter=_adapter(default_model), store=store_module.open_store(tmp_path / "p"))
    index = PacketIndex(first, embedder)
    index.add_documents([Document(text, doc_id) for doc_id, text in CORPUS.items()])
    index.save(tmp_path / "idx")
    # a new process would do exactly this: a new engine over the same store directory
    second = PacketEngine(default_model, adapter=_adapter(default_model), store=store_module.open_store(tmp_path / "p"))
    reopened = PacketIndex.open(tmp_path / "idx", second, embedder, missing_packets="error")
    result = reopened.answer("Who founded Quill Press?", k=2, generation=GEN)
    assert second.counters["packets_built"] == 0 and second.counters["packets_loaded"] == 2
    assert result.text == index.answer("Who founded Quill Press?", k=2, generation=GEN).text


def test_neighbour_calibrated_index_keys_packets_by_their_nearest_chunks(default_model, embedder, tmp_path):
    """Each chunk's packet is built after its nearest chunks of the index; a new document rebuilds only the packets
    of the chunks whose nearest chunks changed; a reopened index finds every packet in the store."""
    from kvpacket_rag.calibration import CalibrationConfig
    from kvpacket_rag.store import LocalStore

    store = LocalStore(tmp_path / "packets")
    engine = PacketEngine(default_model, adapter="none+preamble", store=store)
    calibration = CalibrationConfig(contexts=1, depth=1, neighbours=1)
    index = PacketIndex(engine, embedder, calibration=calibration)
    index.add_documents([Document(text, doc_id) for doc_id, text in CORPUS.items()])
    plain = PacketEngine(default_model, adapter="none+preamble", store=InMemoryStore())
    records = list(index.records.values())
    assert all(store.contains(r.packet_key) and r.packet_key != plain.packet_key(r.text) for r in records)
    before = {r.doc_id: r.packet_key for r in records}
    report = index.add_documents([Document("Quill Press, the Edinburgh publisher founded by Fiona Baird, also "
                                           "prints poetry pamphlets.", "quill-news")])
    after = {r.doc_id: r.packet_key for r in index.records.values()}
    assert after["quill"] != before["quill"] and after["lumen"] == before["lumen"]  # quill's nearest chunk changed
    assert report.packets_built == 2 + 1  # the new chunk's two packets and quill's rebuilt adapter packet
    answer = index.answer("Who founded Quill Press?", k=2, generation=GEN)
    assert answer.text and answer.packets_built == 0  # every packet read from the store
    index.save(tmp_path / "index")
    fresh = PacketEngine(default_model, adapter="none+preamble", store=store)
    reopened = PacketIndex.open(tmp_path / "index", fresh, embedder)
    assert reopened.calibration == calibration and fresh.counters["packets_built"] == 0
    assert {r.chunk_id: r.packet_key for r in reopened.records.values()} == \
        {r.chunk_id: r.packet_key for r in index.records.values()}
    assert index.delete_document("quill-news") == 1 and index.records[0].packet_key == before["quill"]
    with pytest.raises(ValueError, match="set neighbours"):
        PacketIndex(engine, embedder, calibration=CalibrationConfig())
