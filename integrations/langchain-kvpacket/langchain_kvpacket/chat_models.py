"""`ChatKVPacket`: a LangChain chat model that answers over retrieved documents from their KV packets.

Called like any chat model it runs the whole conversation through the model. Called with
``documents=[Document, ...]`` (``llm.invoke(messages, documents=docs)`` or ``llm.bind(documents=docs)``)
it answers the last human message through the documents' packets; earlier turns follow the packets. Adding
``session_id="..."`` keeps the conversation's cache between calls, so that each turn over the same documents
forwards only its new message.
"""

from __future__ import annotations

import warnings
from contextlib import aclosing
from typing import Any, AsyncIterator, Iterator, Literal, Sequence

from kvpacket_rag.aio import iterate_in_thread
from kvpacket_rag.engine import Answer, AnswerStream, PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.models import DEFAULT_MODEL
from kvpacket_rag.rag import (PACKET_KEY, RAGAnswer, RAGAnswerStream, looks_like_pasted_documents, split_turns,
                              stream_answer)
from kvpacket_rag.settings import from_environment, shared_engine
from kvpacket_rag.store import PacketStore
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr

__all__ = ["PACKET_KEY", "ChatKVPacket", "message_text", "split_conversation"]


def message_text(message: BaseMessage) -> str:
    """Text of a message (text blocks of multi-part content joined).

    Raises:
        ValueError: the content holds non-text blocks (images, audio, ...).
    """
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            raise ValueError("ChatKVPacket accepts text content only; drop image/audio/file blocks")
    return "".join(parts)


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    raise ValueError(f"{type(message).__name__} is not supported by ChatKVPacket (no tool calling); pass "
                     "system, human and AI messages only")


def _pairs(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
    return [(_role(m), message_text(m)) for m in messages]


def split_conversation(messages: Sequence[BaseMessage]) -> tuple[str, list]:
    """``(question, earlier turns)`` of a conversation, see `kvpacket_rag.rag.split_turns` (system messages are
    left out with a warning: on the packet path the system prompt is the engine's cached preamble).

    Raises:
        ValueError: no trailing human message, or unsupported message types.
    """
    return split_turns(_pairs(messages))


def _usage(input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0) -> dict:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens,
            "input_token_details": {"cache_read": cache_read, "cache_creation": cache_creation}}


def _pieces(stream: AnswerStream | RAGAnswerStream) -> Iterator[ChatGenerationChunk]:
    """The stream's pieces as chunks; a consumer that stops early stops the generation at once."""
    try:
        for piece in stream:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
    finally:
        stream.close()


class ChatKVPacket(BaseChatModel):
    """Chat model on a `kvpacket_rag.PacketEngine`.

    Settings are taken from keyword arguments first, then from ``KVPACKET_MODEL``, ``KVPACKET_ADAPTER``,
    ``KVPACKET_DEVICE``, ``KVPACKET_DTYPE`` and ``KVPACKET_STORE`` (see `kvpacket_rag.settings`).

    Args:
        model: model id/directory (default: the embedded SmolLM2-135M-Instruct); ignored when ``engine`` is given.
        adapter: ``default`` (shipped adapter), ``none``, or a file path; ignored when ``engine`` is given.
        device, dtype: where and how to load the model; ignored when ``engine`` is given.
        store: a packet store object, a directory or a ``redis://`` URL (default: in process memory).
        engine: an existing engine (model, adapter, packet store); default: a process-wide one per settings,
            loaded on first call.
        temperature, max_tokens, top_p, stop: decoding.
        missing_packets: a document without ``packet_key`` metadata, or whose packet is not in the store:
            ``build`` it on demand (default) or raise (``error``).

    The async methods (``ainvoke``, ``astream``, ``abatch``) run the model in a worker thread and never block the
    event loop; stopping an async stream early stops the generation. One engine serves concurrent calls (threads
    of ``batch``, coroutines of ``abatch``) one model step at a time.

    Every response carries ``usage_metadata`` (with ``input_token_details.cache_read``: context tokens served from
    cached KV, and ``cache_creation``: tokens of packets built for the call), a ``finish_reason`` (``length`` when
    ``max_tokens`` cut the answer) and ``response_metadata["kvpacket"]`` (``ttft_s``, ``packets_hit``,
    ``packets_built``, timings, packet keys).

    Example:
        >>> llm = ChatKVPacket(engine=engine)
        >>> llm.invoke("Tell me a joke.")                                     # plain chat
        >>> llm.invoke("Who founded Quill Press?", documents=retrieved_docs)  # through the documents' packets
        >>> llm.invoke(conversation, documents=retrieved_docs, session_id="user-42")  # the conversation cached
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: str | None = Field(default=None, description="Model id or directory (default: the embedded model).")
    adapter: str | None = Field(default="default", description="Adapter: 'default', 'none' (or None) or a path.")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:1, ...")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16 (default: the device's).")
    store: str | PacketStore | None = Field(default=None, description="Packet store, directory or redis:// URL.")
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=64, gt=0, description="Upper bound on generated tokens.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | None = Field(default=None, description="Strings that end the answer.")
    streaming: bool = Field(default=False, description="Stream by default in invoke (callbacks get tokens).")
    missing_packets: Literal["build", "error"] = "build"
    _engine: PacketEngine | None = PrivateAttr(default=None)

    def __init__(self, engine: PacketEngine | None = None, **kwargs: Any) -> None:
        if engine is not None:
            kwargs.setdefault("model", engine.model.name)
        else:
            kwargs = {**from_environment(kwargs), **kwargs}
        super().__init__(**kwargs)
        self._engine = engine

    @property
    def engine(self) -> PacketEngine:
        if self._engine is None:
            store = self.store if isinstance(self.store, PacketStore) else None
            spec = self.store if isinstance(self.store, str) else None
            self._engine = shared_engine(store, model=self.model, adapter=self.adapter, device=self.device,
                                         dtype=self.dtype, store=spec)
        return self._engine

    @property
    def model_name(self) -> str:
        return self.model or (self._engine.model.name if self._engine is not None else DEFAULT_MODEL)

    @property
    def _llm_type(self) -> str:
        return "kvpacket"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "top_p": self.top_p}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "kvpacket"
        params["ls_model_name"] = kwargs.get("model", self.model_name)
        return params

    def generation(self, stop: Sequence[str] | None = None, **kwargs: Any) -> GenerationConfig:
        """Decoding settings of one call (keyword arguments override the fields)."""
        return GenerationConfig(max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                                temperature=kwargs.get("temperature", self.temperature),
                                top_p=kwargs.get("top_p", self.top_p),
                                stop=tuple(stop if stop is not None else self.stop or ()))

    # ---- generation -------------------------------------------------------------------------------------------

    def answer_documents(self, messages: Sequence[BaseMessage], documents: Sequence[Document],
                         stop: Sequence[str] | None = None, session_id: str | None = None,
                         **kwargs: Any) -> RAGAnswerStream:
        """Stream the answer to the conversation's last human message over ``documents`` through their packets.

        No documents: answered closed-book (``closed_book`` True in the response metadata). With ``session_id``
        the turn goes through that chat session of the engine (`kvpacket_rag.ChatSession`): the same answer, with
        the conversation so far served from the session's kept cache (only the new message is forwarded while the
        documents stay the same). Use one id per conversation.

        Raises:
            MissingPacketKeyError, PacketNotFoundError (``missing_packets='error'``), IncompatiblePacketError
            (a document's ``packet_key`` belongs to another model/adapter), ValueError (bad conversation).
        """
        question, history = split_conversation(messages)
        return stream_answer(self.engine, question, [d.page_content for d in documents],
                             recorded_keys=[d.metadata.get(PACKET_KEY) for d in documents],
                             missing=self.missing_packets, history=history,
                             generation=self.generation(stop, **kwargs), session=session_id)

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        documents = kwargs.pop("documents", None)
        session_id = kwargs.pop("session_id", None)
        if documents is not None:
            stream = self.answer_documents(messages, documents, stop, session_id, **kwargs)
            yield from _pieces(stream)
            result: RAGAnswer = stream.result
            answer = result.answer
            info = {**result.metadata(), "sources": [dict(d.metadata) for d in documents]}
            counts = result.usage()
            usage = _usage(counts["input_tokens"], counts["output_tokens"], counts["cache_read_tokens"],
                           counts["cache_creation_tokens"])
        else:
            pairs = _pairs(messages)
            plain = self.engine.chat(pairs, self.generation(stop, **kwargs))
            yield from _pieces(plain)
            answer = plain.answer
            self._warn_if_pasted(pairs, answer)
            info = {"method": "plain", "closed_book": None, "ttft_s": answer.timings["ttft_s"], "packets_hit": 0,
                    "packets_built": 0, "finish_reason": answer.finish_reason, "timings": answer.timings}
            usage = _usage(answer.question_tokens, len(answer.token_ids))
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", chunk_position="last", usage_metadata=usage,
            response_metadata={"model_name": self.model_name, "finish_reason": answer.finish_reason, "kvpacket": info}))

    @staticmethod
    def _warn_if_pasted(pairs: list[tuple[str, str]], answer: Answer) -> None:
        if looks_like_pasted_documents(pairs[-1][1], answer.question_tokens):
            warnings.warn("ChatKVPacket got documents pasted into the prompt: they ran through the model in full, "
                          "with no packets and no speedup. Pass them as documents instead: "
                          "llm.invoke(messages, documents=docs), or use create_kvpacket_rag_chain(retriever, llm).",
                          UserWarning, stacklevel=4)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
        else:
            chunks = list(self._chunks(messages, stop, **kwargs))
        return self._result(chunks)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            return self._result([chunk async for chunk in self._astream(messages, stop, run_manager, **kwargs)])
        async with aclosing(iterate_in_thread(lambda: self._chunks(messages, stop, **kwargs))) as chunks:
            return self._result([chunk async for chunk in chunks])

    @staticmethod
    def _result(chunks: list[ChatGenerationChunk]) -> ChatResult:
        text = "".join(c.message.content for c in chunks)
        last = chunks[-1].message
        message = AIMessage(content=text, response_metadata=last.response_metadata,
                            usage_metadata=last.usage_metadata)
        info = {"finish_reason": last.response_metadata["finish_reason"]}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, **kwargs):
            if run_manager and chunk.message.content:
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any
                       ) -> AsyncIterator[ChatGenerationChunk]:
        async with aclosing(iterate_in_thread(lambda: self._chunks(messages, stop, **kwargs))) as chunks:
            async for chunk in chunks:
                if run_manager and chunk.message.content:
                    await run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
                yield chunk
