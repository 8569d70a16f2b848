"""ChatKVPacket's async paths: same tokens as the sync ones, a free event loop, early stops that free the engine."""

from __future__ import annotations

import asyncio

from langchain_core.documents import Document
from langchain_core.messages import HumanMessage

from langchain_kvpacket import ChatKVPacket

from kvpacket_rag import PacketEngine

from kvpacket_rag.testing import stream_threads, ticking

DOCS = [Document(page_content="Quill Press was founded in 1988 by Fiona Baird."),
        Document(page_content="Lumen Labs makes sodium-ion batteries in Tromso.")]
QUESTIONS = ["Who founded Quill Press?", "What does Lumen Labs make?", "Where is Lumen Labs?"]


def test_async_calls_give_the_tokens_of_the_sync_calls(tiny_engine):
    llm = ChatKVPacket(engine=tiny_engine, max_tokens=12)
    for question in QUESTIONS[:2]:
        sync = llm.invoke(question, documents=DOCS)
        result = asyncio.run(llm.ainvoke(question, documents=DOCS))
        assert result.content == sync.content
        assert result.usage_metadata["output_tokens"] == sync.usage_metadata["output_tokens"] == 12
        pieces = [c.content for c in llm.stream(question, documents=DOCS)]

        async def apieces():
            return [c.content async for c in llm.astream(question, documents=DOCS)]

        assert asyncio.run(apieces()) == pieces
    assert asyncio.run(llm.ainvoke("Hello!")).content == llm.invoke("Hello!").content  # plain chat
    batch = [m.content for m in llm.batch([[HumanMessage(q)] for q in QUESTIONS], documents=DOCS)]
    abatch = asyncio.run(llm.abatch([[HumanMessage(q)] for q in QUESTIONS], documents=DOCS))
    assert [m.content for m in abatch] == batch
    streaming = ChatKVPacket(engine=tiny_engine, max_tokens=12, streaming=True)
    assert asyncio.run(streaming.ainvoke(QUESTIONS[0], documents=DOCS)).content == llm.invoke(
        QUESTIONS[0], documents=DOCS).content


def test_the_event_loop_keeps_ticking_and_an_early_stop_frees_the_engine(tiny_engine):
    llm = ChatKVPacket(engine=tiny_engine, max_tokens=200)

    async def first_pieces():
        pieces = 0
        stream = llm.astream(QUESTIONS[0], documents=DOCS)
        async for chunk in stream:
            pieces += bool(chunk.content)
            if pieces == 5:
                break
        await stream.aclose()
        return pieces

    pieces, ticks = asyncio.run(ticking(first_pieces()))
    assert pieces == 5 and ticks > pieces
    assert tiny_engine.scheduler.wait_idle() and not stream_threads()


def test_batch_and_abatch_are_decoded_together(tiny_engine):
    """LangChain's default batch runs invoke in a thread pool, abatch runs ainvoke concurrently: both reach the
    engine's scheduler at once, share decode steps, and give the answers of one call at a time."""
    llm = ChatKVPacket(engine=tiny_engine, max_tokens=48)
    inputs = [[HumanMessage(q)] for q in QUESTIONS]
    alone = [llm.invoke(messages, documents=DOCS).content for messages in inputs]
    assert tiny_engine.scheduler.stats()["max_batch"] == 1
    assert [m.content for m in llm.batch(inputs, documents=DOCS)] == alone
    assert tiny_engine.scheduler.stats()["max_batch"] > 1
    fresh = PacketEngine(tiny_engine.model, adapter=tiny_engine.adapter, store=tiny_engine.store)
    llm = ChatKVPacket(engine=fresh, max_tokens=48)
    assert [m.content for m in asyncio.run(llm.abatch(inputs, documents=DOCS))] == alone
    assert fresh.scheduler.stats()["max_batch"] > 1
