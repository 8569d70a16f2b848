"""The langchain-tests standard chat-model tests for ChatKVPacket.

Unit tests: construction and parameters (no model call). Integration tests: invoke/stream/batch/async/
conversation/usage/stop sequences on the real embedded model (plain chat, 8 new tokens). Tool calling,
structured output, JSON mode and image/audio/PDF inputs are not supported, so those standard tests skip
themselves (``has_tool_calling``/``has_structured_output`` are False, ``supports_*`` False); serialisation is
skipped because the model wraps a local engine and is not LangChain-serialisable.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests", reason="install langchain-tests (pip install 'langchain-kvpacket[test]')")

from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from langchain_kvpacket import ChatKVPacket  # noqa: E402


class TestChatKVPacketUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatKVPacket]:
        return ChatKVPacket

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m-instruct"}


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
