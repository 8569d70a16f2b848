"""KVPacketLLM's async paths and the async query/chat engines: same tokens as the sync ones, a free event loop,
early stops that free the engine."""

from __future__ import annotations

import asyncio

from llama_index.core import VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.schema import TextNode

from llama_index.llms.kvpacket import (KVPacketChatEngine, KVPacketEmbedding, KVPacketLLM, KVPacketTransform,
                                       as_kvpacket_query_engine)

from kvpacket_rag.testing import stream_threads, ticking

TEXTS = ["Quill Press was founded in 1988 by Fiona Baird.", "Lumen Labs makes sodium-ion batteries in Tromso.",
         "Orchard Robotics builds fruit-picking robots in Valencia."]
Q1, Q2 = "Who founded Quill Press?", "What does Lumen Labs make?"


def nodes():
    return [TextNode(text=text, id_=f"n{n}") for n, text in enumerate(TEXTS)]


async def deltas(responses) -> list[str]:
    return [r.delta async for r in await responses]


def test_async_llm_calls_give_the_tokens_of_the_sync_calls(tiny_engine):
    llm = KVPacketLLM(tiny_engine, max_new_tokens=12)
    given = nodes()
    for question in (Q1, Q2):
        sync = llm.complete(question, nodes=given)
        result = asyncio.run(llm.acomplete(question, nodes=given))
        assert result.text == sync.text and result.raw["usage"]["completion_tokens"] == 12
        assert asyncio.run(deltas(llm.astream_complete(question, nodes=given))) == [
            r.delta for r in llm.stream_complete(question, nodes=given)]
        messages = [ChatMessage(role=MessageRole.USER, content=question)]
        assert asyncio.run(llm.achat(messages, nodes=given)).message.content == sync.text
        assert asyncio.run(deltas(llm.astream_chat(messages, nodes=given))) == [
            r.delta for r in llm.stream_chat(messages, nodes=given)]
    assert asyncio.run(llm.acomplete("Hello!")).text == llm.complete("Hello!").text  # plain completion


def test_the_event_loop_keeps_ticking_and_an_early_stop_frees_the_engine(tiny_engine):
    llm = KVPacketLLM(tiny_engine, max_new_tokens=200)

    async def first_deltas():
        received = 0
        responses = await llm.astream_chat([ChatMessage(role=MessageRole.USER, content=Q1)], nodes=nodes())
        async for response in responses:
            received += bool(response.delta)
            if received == 5:
                break
        await responses.aclose()
        return received

    received, ticks = asyncio.run(ticking(first_deltas()))
    assert received == 5 and ticks > received
    assert tiny_engine.scheduler.wait_idle() and not stream_threads()


def test_async_query_and_chat_engines_stream_the_sync_answers(tiny_engine, embedder):
    llm, embed_model = KVPacketLLM(tiny_engine, max_new_tokens=12), KVPacketEmbedding(embedder)
    index = VectorStoreIndex(KVPacketTransform(llm)(nodes()), embed_model=embed_model)
    sync_answer = str(as_kvpacket_query_engine(index, llm, similarity_top_k=2).query(Q1))
    streaming = as_kvpacket_query_engine(index, llm, streaming=True, similarity_top_k=2)

    async def query():
        response = await streaming.aquery(Q1)
        return "".join([piece async for piece in response.async_response_gen()])

    assert asyncio.run(query()) == sync_answer
    sync_chat = KVPacketChatEngine.from_index(index, llm, similarity_top_k=2)
    async_chat = KVPacketChatEngine.from_index(index, llm, similarity_top_k=2)
    expected = [sync_chat.chat(q).response for q in (Q1, Q2)]

    async def chat():
        replies = [(await async_chat.achat(Q1)).response]
        response = await async_chat.astream_chat(Q2)
        replies.append("".join([token async for token in response.async_response_gen()]))
        return replies

    assert asyncio.run(chat()) == expected
    assert [m.content for m in async_chat.chat_history] == [m.content for m in sync_chat.chat_history]
    assert tiny_engine.scheduler.wait_idle() and not stream_threads()


def test_concurrent_async_calls_are_decoded_together(tiny_engine, embedder):
    """LlamaIndex batches by running async calls concurrently (``asyncio.gather``, ``run_jobs``): they reach the
    engine's scheduler at once, share decode steps, and give the answers of one call at a time."""
    llm = KVPacketLLM(tiny_engine, max_new_tokens=48)
    given = nodes()
    questions = [Q1, Q2, "Where are fruit-picking robots built?"]
    alone = [llm.complete(q, nodes=given).text for q in questions]
    assert tiny_engine.scheduler.stats()["max_batch"] == 1

    async def together():
        return await asyncio.gather(*(llm.acomplete(q, nodes=given) for q in questions))

    assert [r.text for r in asyncio.run(together())] == alone
    assert tiny_engine.scheduler.stats()["max_batch"] > 1
    index = VectorStoreIndex(KVPacketTransform(llm)(nodes()), embed_model=KVPacketEmbedding(embedder))
    engine = as_kvpacket_query_engine(index, llm, similarity_top_k=2)
    sequential = [str(engine.query(q)) for q in questions]

    async def queries():
        return await asyncio.gather(*(engine.aquery(q) for q in questions))

    assert [str(r) for r in asyncio.run(queries())] == sequential
