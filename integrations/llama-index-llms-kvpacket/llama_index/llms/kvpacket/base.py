"""`KVPacketLLM`: a LlamaIndex LLM that answers over retrieved nodes from their precomputed KV packets.

Called like any LLM (``complete``/``chat`` and their streaming forms) it runs the whole prompt through the
model. Called with ``nodes=`` (retrieved ``NodeWithScore``/``BaseNode`` objects) it answers the prompt
(or the last user message) through the nodes' packets: only the question is forwarded.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.index import RAGAnswerStream, stream_answer, stream_plain
from kvpacket_rag.prompt import ChatTurn
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseGen, CompletionResponse,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

PACKET_KEY = "packet_key"
_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}


def node_text(node: BaseNode | NodeWithScore, metadata_mode: MetadataMode) -> str:
    """The text a node's packet encodes."""
    node = node.node if isinstance(node, NodeWithScore) else node
    return node.get_content(metadata_mode=metadata_mode)


def split_chat(messages: Sequence[ChatMessage]) -> tuple[str, list[ChatTurn]]:
    """``(question, earlier turns)`` of a conversation: the last user message and the exchanges before it.

    System messages are dropped (the packet path's system prompt is part of the engine's cached preamble);
    consecutive user messages are joined.

    Raises:
        ValueError: the conversation does not end with a user message, or holds tool/function messages.
    """
    turns: list[ChatTurn] = []
    pending: list[str] = []
    for message in messages:
        role = message.role
        if role == MessageRole.SYSTEM:
            continue
        if role not in (MessageRole.USER, MessageRole.ASSISTANT):
            raise ValueError(f"{role.value} messages are not supported by KVPacketLLM; pass user/assistant turns only")
        if role == MessageRole.USER:
            pending.append(message.content or "")
        else:
            turns.append(ChatTurn("\n".join(pending), message.content or ""))
            pending = []
    if not pending:
        raise ValueError("the conversation must end with a user message (the question to answer)")
    return "\n".join(pending), turns


class KVPacketLLM(CustomLLM):
    """LlamaIndex LLM on a `kvpacket_rag.PacketEngine`.

    Args:
        engine: the engine (model, adapter, packet store); default: a new one with the embedded default model,
            its shipped adapter and an in-memory store.
        max_new_tokens, temperature, top_p: decoding (per call: ``max_new_tokens=``, ``temperature=``,
            ``top_p=``, ``stop=`` keyword arguments).
        missing_packets: a retrieved node without ``packet_key`` metadata or whose packet is not in the store:
            ``build`` it on demand (default) or raise (``error``).
        metadata_mode: which node content a packet encodes (default: the text alone, ``MetadataMode.NONE``);
            the ingestion transform and the postprocessor must use the same mode.

    Example:
        >>> llm = KVPacketLLM(engine=PacketEngine(store=open_store("packets/")))
        >>> llm.complete("Tell me a joke.")                        # a normal LLM call
        >>> llm.complete("Who founded Quill Press?", nodes=nodes)  # answered through the nodes' packets
    """

    max_new_tokens: int = Field(default=64, gt=0, description="Upper bound on generated tokens.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 for greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when sampling).")
    missing_packets: str = Field(default="build", pattern="^(build|error)$",
                                 description="'build' packets missing for retrieved nodes, or raise ('error').")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE, description="Node content a packet encodes.")
    model_name: str = Field(default="", description="Name of the engine's model.")
    _engine: PacketEngine = PrivateAttr()

    def __init__(self, engine: PacketEngine | None = None, **kwargs: Any) -> None:
        engine = engine if engine is not None else PacketEngine()
        kwargs.setdefault("model_name", engine.model.name)
        super().__init__(**kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "KVPacketLLM"

    @property
    def engine(self) -> PacketEngine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._engine.model.max_positions, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name)

    def generation(self, **kwargs: Any) -> GenerationConfig:
        """Decoding settings of one call (keyword arguments override the fields)."""
        stop = kwargs.get("stop") or ()
        return GenerationConfig(max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
                                temperature=kwargs.get("temperature", self.temperature),
                                top_p=kwargs.get("top_p", self.top_p), stop=tuple([stop] if isinstance(stop, str) else stop))

    # ---- packets ----------------------------------------------------------------------------------------------

    def stream_nodes(self, question: str, nodes: Sequence[BaseNode | NodeWithScore], history: Sequence[ChatTurn] = (),
                     **kwargs: Any) -> RAGAnswerStream:
        """Stream the answer to ``question`` over ``nodes`` (context order) through their packets.

        No nodes: answered closed-book (``closed_book`` True in the result metadata).

        Raises:
            MissingPacketKeyError, PacketNotFoundError (``missing_packets='error'``), IncompatiblePacketError
            (a node's ``packet_key`` belongs to another model/adapter), EmptyInputError.
        """
        texts = [node_text(n, self.metadata_mode) for n in nodes]
        keys = [(n.node if isinstance(n, NodeWithScore) else n).metadata.get(PACKET_KEY) for n in nodes]
        return stream_answer(self._engine, question, texts, recorded_keys=keys, missing=self.missing_packets,
                             history=history, generation=self.generation(**kwargs))

    # ---- completion -------------------------------------------------------------------------------------------

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[tuple[str, str]]:
        if not formatted:
            prompt = self.completion_to_prompt(prompt)
        system = [("system", self.system_prompt)] if self.system_prompt else []
        return system + [("user", prompt)]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt``; with ``nodes=`` answer it through the nodes' packets."""
        last = None
        for last in self.stream_complete(prompt, formatted=formatted, **kwargs):
            pass
        assert last is not None
        return CompletionResponse(text=last.text, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the completion of ``prompt``; with ``nodes=`` answer it through the nodes' packets.

        With nodes, every response carries ``additional_kwargs["kvpacket"]`` (closed_book, packet keys; timings
        once the stream ends).
        """
        nodes = kwargs.pop("nodes", None)
        history = kwargs.pop("history", ())
        if nodes is not None:
            return self._stream_packets(self.stream_nodes(prompt, nodes, history, **kwargs))
        return self._stream_plain(self._prompt_messages(prompt, formatted), **kwargs)

    def _stream_packets(self, stream: RAGAnswerStream) -> CompletionResponseGen:
        info: dict = {"kvpacket": {"closed_book": stream.closed_book}}
        text = ""
        for piece in stream:
            text += piece
            yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
        info["kvpacket"] = stream.result.metadata()
        yield CompletionResponse(text=text, delta="", additional_kwargs=info, raw=stream.result)

    def _stream_plain(self, messages: list[tuple[str, str]], **kwargs: Any) -> CompletionResponseGen:
        stream = stream_plain(self._engine, messages, self.generation(**kwargs))
        info: dict = {"kvpacket": {"closed_book": None}}
        text = ""
        for piece in stream:
            text += piece
            yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
        info["kvpacket"] = {"method": "plain", "timings": stream.timings, "prompt_tokens": stream.prompt_tokens}
        yield CompletionResponse(text=text, delta="", additional_kwargs=info)

    # ---- chat -------------------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply to ``messages``; with ``nodes=`` answer the last user message through the nodes' packets,
        earlier turns following the packets in the prompt."""
        last = None
        for last in self.stream_chat(messages, **kwargs):
            pass
        assert last is not None
        return ChatResponse(message=last.message, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Streaming `chat`."""
        nodes = kwargs.pop("nodes", None)
        if nodes is not None:
            question, history = split_chat(messages)
            completions = self._stream_packets(self.stream_nodes(question, nodes, history, **kwargs))
        else:
            completions = self._stream_plain(self._chat_messages(messages), **kwargs)
        return _as_chat(completions)

    def _chat_messages(self, messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
        converted = []
        if self.system_prompt and not any(m.role == MessageRole.SYSTEM for m in messages):
            converted.append(("system", self.system_prompt))
        for message in messages:
            if message.role not in _ROLES:
                raise ValueError(f"{message.role.value} messages are not supported by KVPacketLLM; "
                                 "pass system/user/assistant messages only")
            converted.append((_ROLES[message.role], message.content or ""))
        return converted


def _as_chat(completions: Iterator[CompletionResponse]) -> ChatResponseGen:
    for completion in completions:
        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=completion.text),
                           delta=completion.delta, additional_kwargs=completion.additional_kwargs, raw=completion.raw)
