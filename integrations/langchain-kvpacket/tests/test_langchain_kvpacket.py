"""LangChain apps answering through KV packets: real SmolLM2 + MiniLM + FAISS over a small inline corpus."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.vectorstores import InMemoryVectorStore

from kvpacket_rag import GenerationConfig, PacketAdapter, PacketEngine
from kvpacket_rag.errors import IncompatiblePacketError, PacketNotFoundError
from kvpacket_rag.index import Document as KVDocument
from kvpacket_rag.index import PacketIndex
from kvpacket_rag.rag import MissingPacketKeyError
from kvpacket_rag.prompt import ChatTurn
from langchain_kvpacket import (PACKET_KEY, ChatKVPacket, KVPacketDocumentTransformer, KVPacketEmbeddings,
                                KVPacketRetriever, PacketIndexRetriever, create_kvpacket_rag_chain)

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


def packet_index(engine, embedder) -> PacketIndex:
    index = PacketIndex(engine, embedder)
    index.add_documents([KVDocument(text, doc_id, {"source": doc_id}) for doc_id, text in CORPUS.items()])
    return index


def lc_documents():
    return [Document(page_content=text, metadata={"source": doc_id}) for doc_id, text in CORPUS.items()]


def test_faiss_chain_equals_packet_index_and_builds_each_packet_once(engine, embedder):
    index = packet_index(engine, embedder)
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    chain = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=2), llm)
    for question in (Q1, Q2):
        message = chain.invoke(question)
        direct = index.answer(question, k=2, generation=GEN)
        assert isinstance(message, AIMessage) and message.content == direct.text
        info = message.response_metadata["kvpacket"]
        assert info["packet_keys"] == direct.packet_keys and info["closed_book"] is False
        assert [s["doc_id"] for s in info["sources"]] == [h.chunk.doc_id for h in direct.sources]
        assert info["forwarded_tokens"] == direct.answer.question_tokens
        assert message.usage_metadata["output_tokens"] == len(direct.answer.token_ids)
    # each chunk's adapter packet and exact packet, built once at ingestion
    assert engine.counters["packets_built"] == 2 * len(CORPUS) == engine.store.stats()["puts"]
    chunks = list(chain.stream(Q1))
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == index.answer(Q1, k=2, generation=GEN).text
    assert chunks[-1].response_metadata["kvpacket"]["timings"]["ttft_s"] > 0
    assert asyncio.run(chain.ainvoke(Q1)).content == chain.invoke(Q1).content  # async via the defaults
    assert engine.counters["packets_built"] == 2 * len(CORPUS)


def test_any_vector_store_with_the_ingestion_transformer(engine, embedder):
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    documents = KVPacketDocumentTransformer(llm, chunk_tokens=24).transform_documents(lc_documents())
    assert len(documents) > len(CORPUS) and all(engine.store.contains(d.metadata[PACKET_KEY]) for d in documents)
    assert all(d.metadata["source"] in CORPUS for d in documents)
    built = engine.counters["packets_built"]
    assert built == 2 * len({d.page_content for d in documents})  # adapter and exact packets
    store = InMemoryVectorStore(KVPacketEmbeddings(embedder))
    store.add_documents(documents)
    chain = create_kvpacket_rag_chain(store.as_retriever(search_kwargs={"k": 3}), llm)
    message = chain.invoke(Q1)
    texts = [d.page_content for d in store.similarity_search(Q1, k=3)]
    assert message.content == engine.answer(Q1, texts, generation=GEN).text
    # the chat model alone, with retrieved documents as a keyword argument
    retrieved = store.similarity_search(Q1, k=3)
    assert llm.invoke(Q1, documents=retrieved).content == message.content
    assert engine.counters["packets_built"] == built


def test_documents_without_keys_or_packets(engine, embedder):
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    raw = InMemoryVectorStore(KVPacketEmbeddings(embedder))
    raw.add_documents(lc_documents())  # ingested without the packet step
    retriever = KVPacketRetriever(retriever=raw.as_retriever(search_kwargs={"k": 2}), llm=llm)
    documents = retriever.invoke(Q1)
    assert all(engine.store.contains(d.metadata[PACKET_KEY]) for d in documents)
    assert engine.counters["packets_built"] == 2
    strict = ChatKVPacket(engine=PacketEngine(engine.model, adapter=engine.adapter), missing_packets="error")
    with pytest.raises(MissingPacketKeyError, match="ingestion"):
        create_kvpacket_rag_chain(raw.as_retriever(), strict).invoke(Q1)
    with pytest.raises(MissingPacketKeyError):
        strict.invoke(Q1, documents=lc_documents()[:1])
    # a recorded key whose packet is gone from the store
    engine.store.delete(documents[0].metadata[PACKET_KEY])
    strict_same_store = ChatKVPacket(engine=engine, missing_packets="error", max_tokens=TOKENS)
    with pytest.raises(PacketNotFoundError, match="not in the store"):
        strict_same_store.invoke(Q1, documents=documents)
    assert llm.invoke(Q1, documents=documents).content  # build policy: rebuilt on demand
    assert engine.counters["packets_built"] == 4  # and the first document's exact packet
    # keys recorded under another adapter
    other = ChatKVPacket(engine=PacketEngine(engine.model, adapter=PacketAdapter.initialize(engine.model, seed=11)))
    with pytest.raises(IncompatiblePacketError, match="re-run the packet ingestion"):
        other.invoke(Q1, documents=documents)


def test_empty_retrieval_answers_closed_book(engine, embedder):
    index = packet_index(engine, embedder)
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    chain = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=2, min_score=1.01), llm)
    message = chain.invoke(Q1)
    assert message.response_metadata["kvpacket"]["closed_book"] is True
    assert message.content == engine.answer(Q1, [], method="closed_book", generation=GEN).text
    assert llm.invoke(Q1, documents=[]).response_metadata["kvpacket"]["closed_book"] is True


def test_plain_chat_works_like_any_chat_model(engine):
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    message = llm.invoke("What is the capital of France?")
    assert "Paris" in message.content and message.response_metadata["kvpacket"]["method"] == "plain"
    assert message.usage_metadata["input_tokens"] > 5
    assert "".join(c.content for c in llm.stream("What is the capital of France?")) == message.content
    with_system = llm.invoke([SystemMessage("Answer in one word."), HumanMessage("What is the capital of France?")])
    assert with_system.content
    with pytest.raises(ValueError, match="tool calling"):
        llm.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    assert engine.counters["packets_built"] == 0


def test_multi_turn_chain_reuses_packets(engine, embedder):
    index = packet_index(engine, embedder)
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    chain = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=2), llm)
    first = chain.invoke("Who founded Nimbus Air?").content
    built = engine.counters["packets_built"]
    follow = chain.invoke({"question": "Where is Nimbus Air headquartered?",
                           "chat_history": [("human", "Who founded Nimbus Air?"), ("ai", first)]})
    expected = index.answer("Where is Nimbus Air headquartered?", k=2, generation=GEN,
                            history=[ChatTurn("Who founded Nimbus Air?", first)])
    assert follow.content == expected.text
    assert engine.counters["packets_built"] == built


def test_session_id_keeps_the_conversation_cached_with_the_same_answers(engine, embedder):
    index = packet_index(engine, embedder)
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    chain = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=2), llm)
    history: list = []
    for turn, question in enumerate(("Who founded Nimbus Air?", "Where is Nimbus Air headquartered?",
                                     "When was Nimbus Air founded?")):
        kept = chain.invoke({"question": question, "chat_history": history, "session_id": "conversation-1"})
        plain = chain.invoke({"question": question, "chat_history": history})
        assert kept.content == plain.content
        forwarded = [m.response_metadata["kvpacket"]["forwarded_tokens"] for m in (kept, plain)]
        if turn and kept.response_metadata["kvpacket"]["packet_keys"] == previous:
            assert forwarded[0] < forwarded[1]  # the conversation came from the session's cache
        previous = kept.response_metadata["kvpacket"]["packet_keys"]
        history += [("human", question), ("ai", kept.content)]
    assert engine.sessions.state("conversation-1") is not None
    docs = lc_documents()[:2]
    one = llm.invoke([HumanMessage(Q1)], documents=docs, session_id="conversation-2")
    two = llm.invoke([HumanMessage(Q1), one, HumanMessage("When?")], documents=docs, session_id="conversation-2")
    fresh = llm.invoke([HumanMessage(Q1), one, HumanMessage("When?")], documents=docs)
    assert two.content == fresh.content
    assert two.response_metadata["kvpacket"]["forwarded_tokens"] < fresh.response_metadata["kvpacket"]["forwarded_tokens"]


def test_usage_reports_packet_cache_reads_creations_and_finish_reason(engine, embedder):
    index = packet_index(engine, embedder)
    llm = ChatKVPacket(engine=engine, max_tokens=TOKENS)
    message = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=2), llm).invoke(Q1)
    direct = index.answer(Q1, k=2, generation=GEN).answer
    usage, info = message.usage_metadata, message.response_metadata["kvpacket"]
    assert usage["input_token_details"]["cache_read"] == direct.context_tokens > 0  # preamble and packets
    assert usage["input_token_details"]["cache_creation"] == 0
    assert usage["input_tokens"] == direct.context_tokens + direct.question_tokens
    assert info["packets_hit"] == 2 and info["packets_built"] == 0 and info["ttft_s"] > 0
    assert message.response_metadata["finish_reason"] == direct.finish_reason
    fresh = ChatKVPacket(engine=PacketEngine(engine.model, adapter=engine.adapter), max_tokens=2)
    documents = lc_documents()[:2]
    built = fresh.invoke(Q1, documents=documents)
    tokens = sum(len(fresh.engine.chunk_ids(d.page_content)) for d in documents)
    first = len(fresh.engine.chunk_ids(documents[0].page_content))  # the first document's exact packet too
    assert built.usage_metadata["input_token_details"]["cache_creation"] == tokens + first
    assert built.response_metadata["kvpacket"]["packets_built"] == 3
    assert built.response_metadata["finish_reason"] == "length" and built.usage_metadata["output_tokens"] == 2
    again = fresh.invoke(Q1, documents=documents)
    assert again.response_metadata["kvpacket"]["packets_hit"] == 2
    assert again.usage_metadata["input_token_details"]["cache_creation"] == 0


def test_ignored_system_messages_and_pasted_documents_warn(engine):
    llm = ChatKVPacket(engine=engine, max_tokens=2)
    with pytest.warns(UserWarning, match="system message is ignored"):
        llm.invoke([SystemMessage("Be brief."), HumanMessage(Q1)], documents=lc_documents()[:1])
    pasted = "Use the following pieces of retrieved context to answer the question.\n" + CORPUS["quill"] + "\n" + Q1
    with pytest.warns(UserWarning, match="pasted into the prompt"):
        llm.invoke(pasted)


def test_settings_come_from_keywords_then_environment(monkeypatch, tmp_path):
    from kvpacket_rag import LocalStore

    monkeypatch.setenv("KVPACKET_STORE", str(tmp_path / "packets"))
    monkeypatch.setenv("KVPACKET_ADAPTER", "none")
    monkeypatch.setenv("KVPACKET_DTYPE", "float32")
    llm = ChatKVPacket(adapter="default", max_tokens=2)
    assert (llm.adapter, llm.store, llm.dtype, llm.device) == ("default", str(tmp_path / "packets"), "float32", "cpu")
    assert isinstance(llm.engine.store, LocalStore) and llm.engine is ChatKVPacket(adapter="default").engine
    assert llm.invoke(Q1, documents=lc_documents()[:1]).response_metadata["kvpacket"]["packets_built"] == 2
    assert len(list((tmp_path / "packets").rglob("*"))) > 0
