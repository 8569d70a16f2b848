"""LlamaIndex apps answering through KV packets: real SmolLM2 + MiniLM + FAISS over a small inline corpus."""

from __future__ import annotations

import warnings

import faiss
import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.schema import TextNode
from llama_index.vector_stores.faiss import FaissVectorStore

from kvpacket_rag import GenerationConfig, PacketAdapter, PacketEngine
from kvpacket_rag.errors import IncompatiblePacketError, PacketNotFoundError
from kvpacket_rag.index import Document as KVDocument
from kvpacket_rag.index import PacketIndex
from kvpacket_rag.rag import MissingPacketKeyError
from kvpacket_rag.prompt import ChatTurn
from llama_index.llms.kvpacket import (PACKET_KEY, KVPacketChatEngine, KVPacketEmbedding, KVPacketLLM,
                                       KVPacketTransform, as_kvpacket_query_engine)

CORPUS = {
    "quill": "Quill Press is an independent publisher in Edinburgh, Scotland. It was founded in 1988 by the poet "
             "Fiona Baird. Quill Press publishes about forty books a year.",
    "nimbus": "Nimbus Air is a regional airline headquartered in Cebu, the Philippines. It flies turboprop planes to "
              "31 islands. Nimbus Air was founded in 2004 by Daniel Reyes.",
    "lumen": "Lumen Labs is a battery company founded in 2011 in Tromso, Norway. Its chief executive is Ingrid "
             "Solberg. Lumen Labs makes sodium-ion batteries for ferries.",
    "orchard": "Orchard Robotics builds fruit-picking robots. The company was founded in 2016 in Valencia, Spain, "
               "by Mateo Ruiz. Its best-selling robot is called Picker Nine.",
}
TOKENS = 16
GEN = GenerationConfig(max_new_tokens=TOKENS)
Q1, Q2 = "Who founded Quill Press?", "Which company makes sodium-ion batteries?"


def documents():
    return [Document(text=text, doc_id=doc_id) for doc_id, text in CORPUS.items()]


def faiss_index(llm, embed_model):
    """The standard ingestion pipeline + FAISS vector store, with the packet step added."""
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=0),
                                                  KVPacketTransform(llm), embed_model])
    nodes = pipeline.run(documents=documents())
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(embed_model.embedder.dim))
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=embed_model)
    return index, nodes


def test_faiss_query_engine_equals_packet_index_and_builds_each_packet_once(engine, embedder):
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index, nodes = faiss_index(llm, embed_model)
    assert all(engine.store.contains(node.metadata[PACKET_KEY]) for node in nodes)
    assert PACKET_KEY not in nodes[0].get_content(metadata_mode="llm")  # hidden from prompts and embeddings
    packet_index = PacketIndex(engine, embedder)
    packet_index.add_documents([KVDocument(text, doc_id) for doc_id, text in CORPUS.items()])
    assert engine.counters["packets_built"] == 2 * len(CORPUS) == engine.store.stats()["puts"]  # adapter + exact

    query_engine = as_kvpacket_query_engine(index, llm, similarity_top_k=2)
    for question in (Q1, Q2):
        response = query_engine.query(question)
        direct = packet_index.answer(question, k=2, generation=GEN)
        assert [n.node.get_content() for n in response.source_nodes] == [h.text for h in direct.sources]
        assert response.response == direct.text
        info = response.metadata["kvpacket"]
        assert info["packet_keys"] == direct.packet_keys and info["closed_book"] is False
        assert info["forwarded_tokens"] == direct.answer.question_tokens  # only the question ran through the model
    assert engine.counters["packets_built"] == 2 * len(CORPUS) == engine.store.stats()["puts"]  # adapter + exact

    streaming = as_kvpacket_query_engine(index, llm, streaming=True, similarity_top_k=2)
    response = streaming.query(Q1)
    pieces = list(response.response_gen)
    assert len(pieces) > 1 and "".join(pieces) == packet_index.answer(Q1, k=2, generation=GEN).text
    assert response.metadata["kvpacket"]["timings"]["ttft_s"] > 0
    assert engine.counters["packets_built"] == 2 * len(CORPUS)


def test_default_vector_store_builds_missing_packets_on_demand_or_refuses(engine, embedder):
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index = VectorStoreIndex.from_documents(documents(), embed_model=embed_model)  # no packet ingestion step
    response = as_kvpacket_query_engine(index, llm, similarity_top_k=2).query(Q1)
    assert engine.counters["packets_built"] == 3  # two adapter packets and the first node's exact packet
    texts = [n.node.get_content() for n in response.source_nodes]
    assert response.response == engine.answer(Q1, texts, generation=GEN).text
    strict = KVPacketLLM(PacketEngine(engine.model, adapter=engine.adapter), max_new_tokens=TOKENS,
                         missing_packets="error")
    fresh = VectorStoreIndex.from_documents(documents(), embed_model=embed_model)
    with pytest.raises(MissingPacketKeyError, match="ingestion"):
        as_kvpacket_query_engine(fresh, strict, similarity_top_k=2).query(Q1)


def test_packet_missing_from_store_and_stale_keys(engine, embedder):
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index, nodes = faiss_index(llm, embed_model)
    quill = next(n for n in nodes if "Quill" in n.get_content())
    engine.store.delete(quill.metadata[PACKET_KEY])
    strict = KVPacketLLM(engine, max_new_tokens=TOKENS, missing_packets="error")
    with pytest.raises(PacketNotFoundError, match="missing_packets='build'|not in the store"):
        as_kvpacket_query_engine(index, strict, similarity_top_k=1).query(Q1)
    built = engine.counters["packets_built"]
    assert as_kvpacket_query_engine(index, llm, similarity_top_k=1).query(Q1).response
    assert engine.counters["packets_built"] == built + 1 and engine.store.contains(quill.metadata[PACKET_KEY])
    other = KVPacketLLM(PacketEngine(engine.model, adapter=PacketAdapter.initialize(engine.model, seed=11)))
    with pytest.raises(IncompatiblePacketError, match="re-run the packet ingestion"):
        as_kvpacket_query_engine(index, other, similarity_top_k=1).query(Q1)


def test_empty_retrieval_answers_closed_book(engine, embedder):
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index, _ = faiss_index(llm, embed_model)
    cut = [SimilarityPostprocessor(similarity_cutoff=1.01)]
    response = as_kvpacket_query_engine(index, llm, node_postprocessors=cut).query(Q1)
    assert response.source_nodes == [] and response.metadata["kvpacket"]["closed_book"] is True
    assert response.response == engine.answer(Q1, [], method="closed_book", generation=GEN).text
    streamed = as_kvpacket_query_engine(index, llm, streaming=True, node_postprocessors=cut).query(Q1)
    assert streamed.metadata["kvpacket"]["closed_book"] is True and "".join(streamed.response_gen) == response.response


def test_plain_prompts_work_like_any_llm(engine):
    llm = KVPacketLLM(engine, max_new_tokens=TOKENS)
    assert llm.metadata.is_chat_model and llm.metadata.context_window == engine.model.max_positions
    completion = llm.complete("What is the capital of France?")
    assert "Paris" in completion.text and completion.additional_kwargs["kvpacket"]["method"] == "plain"
    assert "".join(r.delta for r in llm.stream_complete("What is the capital of France?")) == completion.text
    reply = llm.chat([ChatMessage(role=MessageRole.USER, content="What is the capital of France?")])
    assert reply.message.content == completion.text and reply.message.role == MessageRole.ASSISTANT
    assert engine.counters["packets_built"] == 0


def test_chat_engine_multi_turn_reuses_packets(engine, embedder):
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index, _ = faiss_index(llm, embed_model)
    packet_index = PacketIndex(engine, embedder)
    packet_index.add_documents([KVDocument(text, doc_id) for doc_id, text in CORPUS.items()])
    built = engine.counters["packets_built"]
    chat = KVPacketChatEngine.from_index(index, llm, similarity_top_k=2)
    first = chat.chat("Who founded Nimbus Air?")
    assert first.response == packet_index.answer("Who founded Nimbus Air?", k=2, generation=GEN).text
    follow = chat.stream_chat("Where is Nimbus Air headquartered?")
    text = "".join(follow.response_gen)
    expected = packet_index.answer("Where is Nimbus Air headquartered?", k=2, generation=GEN,
                                   history=[ChatTurn("Who founded Nimbus Air?", first.response)])
    assert text.strip() == expected.text.strip()
    assert [m.role for m in chat.chat_history] == [MessageRole.USER, MessageRole.ASSISTANT] * 2
    assert engine.counters["packets_built"] == built  # every turn reused the stored packets
    assert engine.sessions.state(chat.session.id) is not None  # the conversation's cache is kept
    chat.reset()
    assert chat.chat_history == [] and engine.sessions.state(chat.session.id) is None


def test_chat_session_forwards_only_the_new_message_with_the_same_answers(engine, embedder):
    llm = KVPacketLLM(engine, max_new_tokens=TOKENS)
    nodes = [TextNode(text=CORPUS["nimbus"]), TextNode(text=CORPUS["quill"])]
    session = engine.session()
    messages: list = []
    for turn, question in enumerate(("Who founded Nimbus Air?", "Where is it headquartered?", "And Quill Press?")):
        messages.append(ChatMessage(role=MessageRole.USER, content=question))
        kept = llm.chat(messages, nodes=nodes, session=session)
        fresh = llm.chat(messages, nodes=nodes)
        assert kept.message.content == fresh.message.content
        forwarded = [r.additional_kwargs["kvpacket"]["forwarded_tokens"] for r in (kept, fresh)]
        assert forwarded[0] < forwarded[1] if turn else forwarded[0] == forwarded[1]
        messages.append(kept.message)


def test_token_counting_handler_counts_queries_and_sees_llm_and_synthesize_events(engine, embedder):
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler

    counter, debug = TokenCountingHandler(), LlamaDebugHandler()
    manager = CallbackManager([counter, debug])
    llm, embed_model = KVPacketLLM(engine, max_new_tokens=TOKENS), KVPacketEmbedding(embedder)
    index, _ = faiss_index(llm, embed_model)
    packet_index = PacketIndex(engine, embedder)
    packet_index.add_documents([KVDocument(text, doc_id) for doc_id, text in CORPUS.items()])
    direct = packet_index.answer(Q1, k=2, generation=GEN)
    usage = direct.usage()
    as_kvpacket_query_engine(index, llm, similarity_top_k=2, callback_manager=manager).query(Q1)
    assert counter.prompt_llm_token_count == usage["input_tokens"] > 0
    assert counter.completion_llm_token_count == usage["output_tokens"] == len(direct.answer.token_ids)
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 1 and len(debug.get_event_pairs(CBEventType.SYNTHESIZE)) == 1
    streamed = as_kvpacket_query_engine(index, llm, streaming=True, similarity_top_k=2, callback_manager=manager)
    "".join(streamed.query(Q1).response_gen)
    assert counter.completion_llm_token_count == 2 * usage["output_tokens"]
    llm.callback_manager = manager
    completion = llm.complete(Q1, nodes=[])  # closed-book through packets: one LLM call
    assert completion.raw["usage"]["completion_tokens"] == counter.llm_token_counts[-1].completion_token_count
    assert len(counter.llm_token_counts) == 3  # complete() wraps no second counted call


def test_raw_usage_finish_reason_and_cache_tokens(engine):
    llm = KVPacketLLM(engine, max_new_tokens=2)
    nodes = [TextNode(text=CORPUS["quill"]), TextNode(text=CORPUS["nimbus"])]
    first = llm.complete(Q1, nodes=nodes)
    usage = first.raw["usage"]
    tokens = sum(len(engine.chunk_ids(n.get_content())) for n in nodes)
    tokens += len(engine.chunk_ids(nodes[0].get_content()))  # the first node's exact packet too
    assert usage["cache_creation_tokens"] == tokens and first.raw["kvpacket"]["packets_built"] == 3
    assert first.raw["finish_reason"] == "length" and usage["completion_tokens"] == 2
    again = llm.complete(Q1, nodes=nodes).raw
    assert again["usage"]["cache_creation_tokens"] == 0 and again["kvpacket"]["packets_hit"] == 2
    assert again["usage"]["cache_read_tokens"] == again["usage"]["prompt_tokens"] - again["kvpacket"]["forwarded_tokens"]
    plain = llm.chat([ChatMessage(role=MessageRole.USER, content="Hello")]).raw
    assert plain["usage"]["prompt_tokens"] > 0 and plain["kvpacket"]["method"] == "plain"


def test_model_name_is_loaded_and_settings_round_trip(loaded_model, tmp_path, monkeypatch):
    from kvpacket_rag.testing import make_tiny_model

    tiny = make_tiny_model("llama", loaded_model.tokenizer, seed=3)
    tiny.model.save_pretrained(tmp_path / "tiny")
    loaded_model.tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("KVPACKET_ADAPTER", "none")
    monkeypatch.setenv("KVPACKET_STORE", str(tmp_path / "packets"))
    llm = KVPacketLLM(model_name=str(tmp_path / "tiny"), max_new_tokens=3, temperature=0.5)
    assert llm.adapter == "none" and llm.store == str(tmp_path / "packets")  # from the environment
    assert llm.engine.model.config.hidden_size == tiny.config.hidden_size != loaded_model.config.hidden_size
    assert llm.metadata.model_name == str(tmp_path / "tiny")
    again = KVPacketLLM.from_dict(llm.to_dict())
    assert again.to_dict() == llm.to_dict() and again.engine is llm.engine
    assert KVPacketLLM(model_name=str(tmp_path / "tiny"), adapter="default").adapter == "default"  # keywords first


def test_ignored_prompts_and_pasted_documents_warn(engine, embedder):
    llm = KVPacketLLM(engine, max_new_tokens=2, system_prompt="Be brief.")
    with pytest.warns(UserWarning, match="ignores system_prompt"):
        llm.complete(Q1, nodes=[TextNode(text=CORPUS["quill"])])
    wrapped = KVPacketLLM(engine, max_new_tokens=2, completion_to_prompt=lambda prompt: f"[{prompt}]")
    with pytest.warns(UserWarning, match="ignores completion_to_prompt"):
        wrapped.complete(Q1, nodes=[TextNode(text=CORPUS["quill"])])
    plain = KVPacketLLM(engine, max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.complete(Q1, nodes=[TextNode(text=CORPUS["quill"])])  # nothing ignored: no warning
    with pytest.warns(UserWarning, match="system message is ignored"):
        plain.chat([ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
                    ChatMessage(role=MessageRole.USER, content=Q1)], nodes=[TextNode(text=CORPUS["quill"])])
    with pytest.warns(UserWarning, match="pasted into the prompt"):
        plain.complete("Context information is below.\n---------------------\n" + CORPUS["quill"] + "\n" + Q1)
    index = VectorStoreIndex.from_documents(documents(), embed_model=KVPacketEmbedding(embedder))
    from llama_index.core import PromptTemplate

    with pytest.warns(UserWarning, match="ignores text_qa_template"):
        as_kvpacket_query_engine(index, plain, text_qa_template=PromptTemplate("{context_str} {query_str}"))
