"""`ChatKVPacket`: a LangChain chat model that answers over retrieved documents from their KV packets.

Called like any chat model it runs the whole conversation through the model. Called with
``documents=[Document, ...]`` (``llm.invoke(messages, documents=docs)`` or ``llm.bind(documents=docs)``)
it answers the last human message through the documents' packets; earlier turns follow the packets.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator, Literal, Sequence

from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.index import RAGAnswerStream, stream_answer, stream_plain
from kvpacket_rag.models import DEFAULT_MODEL
from kvpacket_rag.prompt import ChatTurn
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import Field, PrivateAttr

PACKET_KEY = "packet_key"
_ENGINES: dict[tuple, PacketEngine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(model: str, adapter: str | None, device: str) -> PacketEngine:
    """One engine per (model, adapter, device) in this process, loaded on first use."""
    key = (model, adapter, device)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = PacketEngine(None if model == DEFAULT_MODEL else model, adapter=adapter, device=device)
        return _ENGINES[key]


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


def split_conversation(messages: Sequence[BaseMessage]) -> tuple[str, list[ChatTurn]]:
    """``(question, earlier turns)``: the trailing human message(s) and the exchanges before them.

    System messages are dropped on the packet path (its system prompt is the engine's cached preamble).

    Raises:
        ValueError: no trailing human message, or unsupported message types.
    """
    turns: list[ChatTurn] = []
    pending: list[str] = []
    for message in messages:
        role = _role(message)
        if role == "user":
            pending.append(message_text(message))
        elif role == "assistant":
            turns.append(ChatTurn("\n".join(pending), message_text(message)))
            pending = []
    if not pending:
        raise ValueError("the conversation must end with a human message (the question to answer)")
    return "\n".join(pending), turns


class ChatKVPacket(BaseChatModel):
    """Chat model on a `kvpacket_rag.PacketEngine`.

    Args:
        model: model id/directory (default: the embedded SmolLM2-135M-Instruct); ignored when ``engine`` is given.
        adapter: ``default`` (shipped adapter), a file path, or None; ignored when ``engine`` is given.
        engine: an existing engine (model, adapter, packet store); default: a process-wide one per
            (model, adapter, device), loaded on first call.
        temperature, max_tokens, top_p, stop: decoding.
        missing_packets: a document without ``packet_key`` metadata, or whose packet is not in the store:
            ``build`` it on demand (default) or raise (``error``).

    Example:
        >>> llm = ChatKVPacket(engine=engine)
        >>> llm.invoke("Tell me a joke.")                                     # plain chat
        >>> llm.invoke("Who founded Quill Press?", documents=retrieved_docs)  # through the documents' packets
    """

    model: str = Field(default=DEFAULT_MODEL, description="Model id or directory.")
    adapter: str | None = Field(default="default", description="Adapter: 'default', a path, or None.")
    device: str = Field(default="cpu")
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
        super().__init__(**kwargs)
        self._engine = engine

    @property
    def engine(self) -> PacketEngine:
        if self._engine is None:
            self._engine = shared_engine(self.model, self.adapter, self.device)
        return self._engine

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
        return params

    def generation(self, stop: Sequence[str] | None = None, **kwargs: Any) -> GenerationConfig:
        """Decoding settings of one call (keyword arguments override the fields)."""
        return GenerationConfig(max_new_tokens=kwargs.get("max_tokens", self.max_tokens),
                                temperature=kwargs.get("temperature", self.temperature),
                                top_p=kwargs.get("top_p", self.top_p),
                                stop=tuple(stop if stop is not None else self.stop or ()))

    # ---- generation -------------------------------------------------------------------------------------------

    def answer_documents(self, messages: Sequence[BaseMessage], documents: Sequence[Document],
                         stop: Sequence[str] | None = None, **kwargs: Any) -> RAGAnswerStream:
        """Stream the answer to the conversation's last human message over ``documents`` through their packets.

        No documents: answered closed-book (``closed_book`` True in the response metadata).

        Raises:
            MissingPacketKeyError, PacketNotFoundError (``missing_packets='error'``), IncompatiblePacketError
            (a document's ``packet_key`` belongs to another model/adapter), ValueError (bad conversation).
        """
        question, history = split_conversation(messages)
        return stream_answer(self.engine, question, [d.page_content for d in documents],
                             recorded_keys=[d.metadata.get(PACKET_KEY) for d in documents],
                             missing=self.missing_packets, history=history,
                             generation=self.generation(stop, **kwargs))

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
                ) -> Iterator[ChatGenerationChunk]:
        documents = kwargs.pop("documents", None)
        if documents is not None:
            stream = self.answer_documents(messages, documents, stop, **kwargs)
            yield from (ChatGenerationChunk(message=AIMessageChunk(content=piece)) for piece in stream)
            result = stream.result
            info = {**result.metadata(), "sources": [dict(d.metadata) for d in documents]}
            usage = {"input_tokens": result.answer.context_tokens + result.answer.question_tokens,
                     "output_tokens": len(result.answer.token_ids)}
        else:
            plain = stream_plain(self.engine, [(_role(m), message_text(m)) for m in messages],
                                 self.generation(stop, **kwargs))
            yield from (ChatGenerationChunk(message=AIMessageChunk(content=piece)) for piece in plain)
            info = {"method": "plain", "closed_book": None, "timings": plain.timings}
            usage = {"input_tokens": plain.prompt_tokens, "output_tokens": len(plain.token_ids)}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", chunk_position="last", usage_metadata=usage,
            response_metadata={"model_name": self.model, "finish_reason": "stop", "kvpacket": info}))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop, run_manager, **kwargs))
        else:
            chunks = list(self._chunks(messages, stop, **kwargs))
        text = "".join(c.message.content for c in chunks)
        last = chunks[-1].message
        message = AIMessage(content=text, response_metadata=last.response_metadata,
                            usage_metadata=last.usage_metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(messages, stop, **kwargs):
            if run_manager and chunk.message.content:
                run_manager.on_llm_new_token(chunk.message.content, chunk=chunk)
            yield chunk
