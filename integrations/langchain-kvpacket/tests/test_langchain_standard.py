"""The langchain-tests standard tests: chat model (ChatKVPacket), embeddings (KVPacketEmbeddings) and retriever
(PacketIndexRetriever).

Unit tests: construction and parameters (no model call). Integration tests: invoke/stream/batch/async/
conversation/usage/stop sequences on the real embedded model (plain chat, 8 new tokens). Tool calling,
structured output, JSON mode and image/audio/PDF inputs are not supported, so those standard tests skip
themselves (``has_tool_calling``/``has_structured_output`` are False, ``supports_*`` False); serialisation is
skipped because the model wraps a local engine and is not LangChain-serialisable.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests", reason="install langchain-tests (pip install 'langchain-kvpacket[test]')")

import functools  # noqa: E402

from langchain_tests.integration_tests import (ChatModelIntegrationTests, EmbeddingsIntegrationTests,  # noqa: E402
                                               RetrieversIntegrationTests)
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests  # noqa: E402

from kvpacket_rag import Document, PacketEngine, PacketIndex, load_model  # noqa: E402
from langchain_kvpacket import ChatKVPacket, KVPacketEmbeddings, PacketIndexRetriever  # noqa: E402


class TestChatKVPacketUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVPacket]:
        return ChatKVPacket

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m-instruct"}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"KVPACKET_DEVICE": "cpu", "KVPACKET_DTYPE": "float32", "KVPACKET_ADAPTER": "none"},
                {"model": "smollm2-135m-instruct"}, {"device": "cpu", "dtype": "float32", "adapter": "none"})


# the async standard tests need pytest-asyncio, and the root config sets no asyncio_mode: mark the class
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function.*is marked with .@pytest.mark.asyncio.:pytest.PytestWarning")
class TestChatKVPacketIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatKVPacket]:
        return ChatKVPacket

    @property
    def chat_model_params(self) -> dict:
        # plain chat only: no adapter needed; 8 tokens keep the suite fast on 2 CPU cores
        return {"model": "smollm2-135m-instruct", "adapter": None, "max_tokens": 8}


class TestKVPacketEmbeddingsUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[KVPacketEmbeddings]:
        return KVPacketEmbeddings


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function.*is marked with .@pytest.mark.asyncio.:pytest.PytestWarning")
class TestKVPacketEmbeddingsIntegration(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[KVPacketEmbeddings]:
        return KVPacketEmbeddings


@functools.cache
def _small_index() -> PacketIndex:
    """A packet index over a few short documents (bare packets: retrieval does not depend on the adapter)."""
    index = PacketIndex(PacketEngine(load_model(), adapter=None))
    index.add_documents([Document(f"Fact {n}: the {word} example sentence number {n}.", doc_id=f"d{n}")
                         for n, word in enumerate(("first", "second", "third", "fourth", "fifth", "sixth"))])
    return index


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function.*is marked with .@pytest.mark.asyncio.:pytest.PytestWarning")
class TestPacketIndexRetrieverIntegration(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[PacketIndexRetriever]:
        return PacketIndexRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": _small_index()}

    @property
    def retriever_query_example(self) -> str:
        return "Which sentence is the third example?"
