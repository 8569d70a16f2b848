"""`kvpacket demo`: the bundled corpus, the index it keeps in the cache directory, retrieval for follow-ups, and
the command itself end to end on the real default model (fresh cache, then a second run reusing every packet)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvpacket_rag.cli import main as cli_main
from kvpacket_rag.demo import (CORPUS_DIR, DemoChat, index_dir_for, load_corpus, open_demo_index, quiet_embedder,
                               suggested_questions)
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.index import Document
from kvpacket_rag.models import default_model_dir
from kvpacket_rag.prompt import ChatTurn
from kvpacket_rag.store import open_store

THREADS = os.environ.get("KVPACKET_TEST_THREADS", "2")


@pytest.fixture(scope="module")
def embedder():
    return quiet_embedder()


# ---- the corpus ----------------------------------------------------------------------------------------------------


def test_corpus_is_short_distinct_documents():
    docs = load_corpus()
    assert 30 <= len(docs) <= 40
    assert len({d.doc_id for d in docs}) == len(docs) and len({d.text for d in docs}) == len(docs)
    for doc in docs:
        assert doc.doc_id.endswith(".txt") and 60 < len(doc.text) < 400, doc.doc_id
        assert doc.metadata["title"]


def test_suggested_questions_name_their_source_and_answer():
    docs = {d.doc_id: d.text for d in load_corpus()}
    questions = suggested_questions()
    assert 6 <= len(questions) <= 10
    for q in questions:
        assert q.source in docs, q
        assert q.answer.lower() in docs[q.source].lower(), q


def test_retrieval_puts_the_source_of_each_suggested_question_first(embedder):
    docs = load_corpus()
    vectors = embedder.embed([d.text for d in docs])
    for q in suggested_questions():
        best = int(np.argmax(vectors @ embedder.embed_query(q.question)))
        assert docs[best].doc_id == q.source, q.question


def test_load_corpus_refuses_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no non-empty .txt"):
        load_corpus(tmp_path)


# ---- index reuse and follow-up retrieval (tiny model: fast) --------------------------------------------------------


def _engine(model, store_dir: Path) -> PacketEngine:
    return PacketEngine(model, adapter=None, store=open_store(store_dir))


def test_saved_index_is_reopened_and_only_changed_documents_are_rebuilt(tiny_llama, embedder, tmp_path):
    corpus = load_corpus()[:6]
    logs: list[str] = []
    engine = _engine(tiny_llama, tmp_path / "packets")
    index, first = open_demo_index(engine, corpus, tmp_path, progress=False, log=logs.append)
    assert not first.reopened and first.packets_built == 12 and first.documents == 6  # adapter and exact packets
    assert (index_dir_for(engine, tmp_path) / "manifest.json").is_file()

    engine = _engine(tiny_llama, tmp_path / "packets")  # a new process: nothing in memory
    _, again = open_demo_index(engine, corpus, tmp_path, progress=False, log=logs.append)
    assert again.reopened and again.packets_built == 0 and again.packets_reused == 12

    edited = [*corpus[:5], Document(corpus[5].text + " It also sells postcards.", corpus[5].doc_id, corpus[5].metadata)]
    engine = _engine(tiny_llama, tmp_path / "packets")
    index, synced = open_demo_index(engine, edited, tmp_path, progress=False, log=logs.append)
    assert synced.reopened and synced.packets_built == 2 and synced.documents == 6
    assert any("postcards" in hit.text for hit in index.search(corpus[5].text, 1))


def test_an_index_ingested_for_kv_packet_gets_its_exact_packets_when_reopened(tiny_llama, embedder, tmp_path):
    corpus = load_corpus()[:3]
    older = PacketEngine(tiny_llama, adapter=None, store=open_store(tmp_path / "packets"), method="kv_packet")
    _, first = open_demo_index(older, corpus, tmp_path, progress=False, log=lambda _: None)
    assert first.packets_built == 3  # one packet per chunk
    engine = _engine(tiny_llama, tmp_path / "packets")  # the default method also reads exact packets
    index, again = open_demo_index(engine, corpus, tmp_path, progress=False, log=lambda _: None)
    assert again.reopened and again.packets_built == 3 and again.packets_reused == 3
    assert all(engine.store.contains(engine.packet_key(r.text, "exact")) for r in index.records.values())


def test_a_neighbour_calibrated_demo_index_is_kept_apart_and_reopened_without_building(tiny_llama, embedder,
                                                                                       tmp_path):
    from kvpacket_rag.calibration import CalibrationConfig

    corpus = load_corpus()[:4]
    calibration = CalibrationConfig(contexts=1, depth=1, neighbours=2)
    engine = _engine(tiny_llama, tmp_path / "packets")
    plain, _ = open_demo_index(engine, corpus, tmp_path, progress=False, log=lambda _: None)
    index, first = open_demo_index(engine, corpus, tmp_path, progress=False, log=lambda _: None,
                                   calibration=calibration)
    assert index_dir_for(engine, tmp_path, calibration) != index_dir_for(engine, tmp_path)
    assert index.calibration == calibration and first.packets_built == 4  # adapter packets only: exact ones are shared
    assert all(plain.records[i].packet_key != index.records[i].packet_key for i in index.records)
    engine = _engine(tiny_llama, tmp_path / "packets")
    reopened, again = open_demo_index(engine, corpus, tmp_path, progress=False, log=lambda _: None,
                                      calibration=calibration)
    assert again.reopened and again.packets_built == 0 and reopened.calibration == calibration


def test_follow_up_questions_retrieve_the_entity_of_the_conversation(tiny_llama, embedder, tmp_path):
    engine = _engine(tiny_llama, tmp_path / "packets")
    index, _ = open_demo_index(engine, load_corpus(), tmp_path, progress=False, log=lambda _: None)
    chat = DemoChat(index, top_k=2)
    assert "kaito_brennan.txt" not in [h.chunk.doc_id for h in chat.retrieve("Who is his coach?")]
    chat.history.append(ChatTurn("Where was Kaito Brennan born?", "In Sapporo, Japan."))
    assert chat.retrieve("Who is his coach?")[0].chunk.doc_id == "kaito_brennan.txt"
    # a new topic still wins over the conversation's entity
    assert chat.retrieve("What is the chip of Saffron Circuit called?")[0].chunk.doc_id == "saffron_circuit.txt"


def test_chat_records_turns_and_reset_forgets_them(tiny_llama, embedder, tmp_path):
    from kvpacket_rag.generation import GenerationConfig

    engine = _engine(tiny_llama, tmp_path / "packets")
    index, _ = open_demo_index(engine, load_corpus()[:4], tmp_path, progress=False, log=lambda _: None)
    chat = DemoChat(index, top_k=2, generation=GenerationConfig(max_new_tokens=3))
    first = chat.ask("Where is Bramblegate Bakery?", compare=True)
    assert first.full is not None and first.full.answer.method == "full_recompute"
    exact = engine.packet_key(first.sources[0].text, "exact")  # the first chunk is read from its exact packet
    assert first.packet.packet_keys == [exact] + [h.packet_key for h in first.sources[1:]]
    assert first.history_turns == 0
    second = chat.ask("When was it founded?")
    assert second.history_turns == 1 and len(chat.history) == 2
    chat.reset()
    assert chat.history == []
    with pytest.raises(ValueError, match="top_k"):
        DemoChat(index, top_k=0)


def test_follow_ups_over_the_same_chunks_come_from_the_chat_session(tiny_llama, embedder, tmp_path):
    from kvpacket_rag.generation import GenerationConfig

    engine = _engine(tiny_llama, tmp_path / "packets")
    index, _ = open_demo_index(engine, load_corpus()[:1], tmp_path, progress=False, log=lambda _: None)
    chat = DemoChat(index, top_k=1, generation=GenerationConfig(max_new_tokens=4))
    first = chat.ask("Where is Bramblegate Bakery?")
    second = chat.ask("When was it founded?", compare=True)
    assert not first.conversation_cached and second.conversation_cached
    assert second.packet.answer.forwarded_tokens < second.full.answer.forwarded_tokens
    fresh = engine.answer("When was it founded?", [h.text for h in second.sources], history=chat.history[:1],
                          generation=chat.generation)
    assert second.packet.answer.token_ids == fresh.token_ids
    assert second.to_dict()["conversation_cached"] is True


def test_chat_reads_packets_through_the_method_it_is_given(tiny_llama, embedder, tmp_path):
    from kvpacket_rag.generation import GenerationConfig

    engine = _engine(tiny_llama, tmp_path / "packets")
    index, _ = open_demo_index(engine, load_corpus()[:2], tmp_path, progress=False, log=lambda _: None)
    chat = DemoChat(index, top_k=2, generation=GenerationConfig(max_new_tokens=4), method="kv_packet_first_exact")
    first = chat.ask("Where is Bramblegate Bakery?", compare=True)
    second = chat.ask("When was it founded?")
    texts = [h.text for h in first.sources]
    assert first.packet.answer.method == "kv_packet_first_exact" and first.full.answer.method == "full_recompute"
    expected = engine.answer("Where is Bramblegate Bakery?", texts, method="kv_packet_first_exact",
                             generation=chat.generation)
    assert first.packet.answer.token_ids == expected.token_ids
    assert [h.text for h in second.sources] == texts and second.conversation_cached  # from the session
    fresh = engine.answer("When was it founded?", [h.text for h in second.sources], history=chat.history[:1],
                          method="kv_packet_first_exact", generation=chat.generation)
    assert second.packet.answer.token_ids == fresh.token_ids
    with pytest.raises(ValueError, match="kv_packet_first_exact"):
        DemoChat(index, method="full_recompute")


def test_bad_top_k_is_a_clear_cli_error(capsys):
    assert cli_main(["demo", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err


# ---- the command end to end (real default model) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory) -> Path:
    """An empty KVPACKET_CACHE sharing only the converted default model with the user's cache."""
    root = tmp_path_factory.mktemp("kvpacket-cache")
    (root / "models").symlink_to(default_model_dir().parent, target_is_directory=True)
    return root


def _demo(cache: Path, *args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "KVPACKET_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kvpacket_rag", "demo", "--threads", THREADS, *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout)


def test_demo_answers_from_a_fresh_cache_then_reuses_every_packet(fresh_cache):
    corpus = {p.name for p in CORPUS_DIR.glob("*.txt")}
    question = suggested_questions()[0]

    first = _demo(fresh_cache, "--question", question.question, "--compare", "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["ingest"]["packets_built"] == 2 * len(corpus) and not result["ingest"]["reopened"]
    assert Path(result["ingest"]["index_dir"]).parent == fresh_cache / "demo"
    (answer,) = result["answers"]
    sources = [s["doc_id"] for s in answer["sources"]]
    assert len(sources) == 3 and set(sources) <= corpus and sources[0] == question.source
    assert answer["answer"].strip() and answer["kv_packet"]["ttft_s"] > 0
    assert question.answer.lower() in answer["full_recompute"]["text"].lower()
    assert answer["kv_packet"]["forwarded_tokens"] < answer["full_recompute"]["forwarded_tokens"]

    # No --question and no terminal on stdin: the suggested questions, answered non-interactively.
    second = _demo(fresh_cache)
    assert second.returncode == 0, second.stderr
    assert f"packets: 0 built, {2 * len(corpus)} reused" in second.stderr
    assert "reopened the saved index" in second.stderr
    assert second.stdout.count("Bot (KV packets):") == len(suggested_questions())
    source_lines = [line for line in second.stdout.splitlines() if line.strip().startswith("sources:")]
    assert len(source_lines) == len(suggested_questions())
    assert all(any(name in line for name in corpus) for line in source_lines)
