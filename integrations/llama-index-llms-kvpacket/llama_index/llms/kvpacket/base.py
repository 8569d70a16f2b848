"""`KVPacketLLM`: a LlamaIndex LLM that answers over retrieved nodes from their precomputed KV packets.

Called like any LLM (``complete``/``chat`` and their streaming forms) it runs the whole prompt through the
model. Called with ``nodes=`` (retrieved ``NodeWithScore``/``BaseNode`` objects) it answers the prompt
(or the last user message) through the nodes' packets: only the question is forwarded.
"""

from __future__ import annotations

import warnings
from contextlib import aclosing
from typing import Any, AsyncIterator, Iterator, Sequence

from kvpacket_rag import Answer, AnswerStream, ChatSession, ChatTurn, GenerationConfig, PacketEngine, PacketStore
from kvpacket_rag.aio import iterate_in_thread
from kvpacket_rag.models import DEFAULT_MODEL
from kvpacket_rag.rag import (PACKET_KEY, RAGAnswer, RAGAnswerStream, looks_like_pasted_documents, split_turns,
                              stream_answer)
from kvpacket_rag.settings import from_environment, shared_engine
from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen, CompletionResponseGen,
                                              LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt, generic_messages_to_prompt
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore

__all__ = ["PACKET_KEY", "KVPacketLLM", "node_text", "split_chat", "usage_raw"]

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}


def node_text(node: BaseNode | NodeWithScore, metadata_mode: MetadataMode) -> str:
    """The text a node's packet encodes."""
    node = node.node if isinstance(node, NodeWithScore) else node
    return node.get_content(metadata_mode=metadata_mode)


def _pairs(messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    pairs = []
    for message in messages:
        if message.role not in _ROLES:
            raise ValueError(f"{message.role.value} messages are not supported by KVPacketLLM; "
                             "pass system/user/assistant messages only")
        pairs.append((_ROLES[message.role], message.content or ""))
    return pairs


def split_chat(messages: Sequence[ChatMessage]) -> tuple[str, list[ChatTurn]]:
    """``(question, earlier turns)`` of a conversation, see `kvpacket_rag.rag.split_turns` (system messages are
    left out with a warning: on the packet path the system prompt is the engine's cached preamble).

    Raises:
        ValueError: the conversation does not end with a user message, or holds tool/function messages.
    """
    return split_turns(_pairs(messages))


def usage_raw(answer: Answer, result: RAGAnswer | None = None) -> dict:
    """The ``raw`` payload of a response: OpenAI-style ``usage`` (which `TokenCountingHandler` reads), with
    ``cache_read_tokens``/``cache_creation_tokens`` on the packet path, plus the ``kvpacket`` metadata."""
    if result is not None:
        counts = result.usage()
        usage = {"prompt_tokens": counts["input_tokens"], "completion_tokens": counts["output_tokens"],
                 "total_tokens": counts["total_tokens"], "cache_read_tokens": counts["cache_read_tokens"],
                 "cache_creation_tokens": counts["cache_creation_tokens"]}
        info = result.metadata()
    else:
        usage = {"prompt_tokens": answer.question_tokens, "completion_tokens": len(answer.token_ids),
                 "total_tokens": answer.question_tokens + len(answer.token_ids)}
        info = {"method": "plain", "ttft_s": answer.timings["ttft_s"], "finish_reason": answer.finish_reason,
                "timings": answer.timings, "prompt_tokens": answer.question_tokens}
    return {"usage": usage, "finish_reason": answer.finish_reason, "kvpacket": info}


class KVPacketLLM(CustomLLM):
    """LlamaIndex LLM on a `kvpacket_rag.PacketEngine`.

    Settings come from keyword arguments first, then ``KVPACKET_MODEL``, ``KVPACKET_ADAPTER``, ``KVPACKET_DEVICE``,
    ``KVPACKET_DTYPE`` and ``KVPACKET_STORE`` (see `kvpacket_rag.settings`); ``to_dict``/``from_dict`` round-trip them.

    Args:
        engine: an existing engine (model, adapter, packet store); default: a process-wide one per settings.
        model_name: model id or directory to load (default: the embedded SmolLM2-135M-Instruct).
        adapter: ``default``, ``none`` or an adapter file. device, dtype: where and how to load the model.
        store: a packet store object, a directory or a ``redis://`` URL (default: in process memory).
        max_new_tokens, temperature, top_p: decoding (per call: ``max_new_tokens=``, ``temperature=``,
            ``top_p=``, ``stop=`` keyword arguments).
        missing_packets: a retrieved node without ``packet_key`` metadata or whose packet is not in the store:
            ``build`` it on demand (default) or raise (``error``).
        metadata_mode: which node content a packet encodes (default: the text alone, ``MetadataMode.NONE``);
            the ingestion transform and the postprocessor must use the same mode.

    Responses carry ``raw = {"usage": {...}, "finish_reason": ..., "kvpacket": {...}}``, so token counting
    handlers count every call.

    Example:
        >>> llm = KVPacketLLM(store="packets/")
        >>> llm.complete("Tell me a joke.")                        # a normal LLM call
        >>> llm.complete("Who founded Quill Press?", nodes=nodes)  # answered through the nodes' packets
    """

    max_new_tokens: int = Field(default=64, gt=0, description="Upper bound on generated tokens.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 for greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (when sampling).")
    missing_packets: str = Field(default="build", pattern="^(build|error)$",
                                 description="'build' packets missing for retrieved nodes, or raise ('error').")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE, description="Node content a packet encodes.")
    model_name: str = Field(default="", description="Model id or directory (default: the embedded model).")
    adapter: str | None = Field(default="default", description="Adapter: 'default', 'none' (or None) or a file.")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:1, ...")
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16 (default: the device's).")
    store: str | None = Field(default=None, description="Packet store directory or redis:// URL.")
    _engine: PacketEngine | None = PrivateAttr(default=None)
    _store: PacketStore | None = PrivateAttr(default=None)

    def __init__(self, engine: PacketEngine | None = None, store: str | PacketStore | None = None,
                 **kwargs: Any) -> None:
        if engine is not None:
            kwargs.setdefault("model_name", engine.model.name)
        else:
            given = {"model" if name == "model_name" else name: value for name, value in kwargs.items()}
            if store is not None:
                given["store"] = store
            environment = from_environment(given)
            kwargs = {**{"model_name" if n == "model" else n: v for n, v in environment.items() if n != "store"},
                      **kwargs}
            store = store if store is not None else environment.get("store")
        super().__init__(store=store if isinstance(store, str) else None, **kwargs)
        self._engine = engine
        self._store = store if isinstance(store, PacketStore) else None

    @classmethod
    def class_name(cls) -> str:
        return "KVPacketLLM"

    @property
    def engine(self) -> PacketEngine:
        if self._engine is None:
            self._engine = shared_engine(self._store, model=self.model_name or None, adapter=self.adapter,
                                         device=self.device, dtype=self.dtype, store=self.store)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.engine.model.max_positions, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name or self.engine.model.name or DEFAULT_MODEL)

    def generation(self, **kwargs: Any) -> GenerationConfig:
        """Decoding settings of one call (keyword arguments override the fields)."""
        stop = kwargs.get("stop") or ()
        return GenerationConfig(max_new_tokens=kwargs.get("max_new_tokens", self.max_new_tokens),
                                temperature=kwargs.get("temperature", self.temperature),
                                top_p=kwargs.get("top_p", self.top_p), stop=tuple([stop] if isinstance(stop, str) else stop))

    # ---- packets ----------------------------------------------------------------------------------------------

    def stream_nodes(self, question: str, nodes: Sequence[BaseNode | NodeWithScore], history: Sequence[ChatTurn] = (),
                     session: ChatSession | str | None = None, **kwargs: Any) -> RAGAnswerStream:
        """Stream the answer to ``question`` over ``nodes`` (context order) through their packets.

        With ``session`` (a `kvpacket_rag.ChatSession` or a session id) the turn reuses the conversation's kept
        cache: the same answer, only the new message forwarded while the nodes stay the same.

        No nodes: answered closed-book (``closed_book`` True in the result metadata). A ``system_prompt``,
        ``messages_to_prompt`` or ``completion_to_prompt`` set on this LLM is not applied here (the prompt is the
        engine's cached preamble, the packets and the question): a warning says so.

        Raises:
            MissingPacketKeyError, PacketNotFoundError (``missing_packets='error'``), IncompatiblePacketError
            (a node's ``packet_key`` belongs to another model/adapter), EmptyInputError.
        """
        self._warn_ignored_wrappers()
        texts = [node_text(n, self.metadata_mode) for n in nodes]
        keys = [(n.node if isinstance(n, NodeWithScore) else n).metadata.get(PACKET_KEY) for n in nodes]
        return stream_answer(self.engine, question, texts, recorded_keys=keys, missing=self.missing_packets,
                             history=history, generation=self.generation(**kwargs), session=session)

    def _warn_ignored_wrappers(self) -> None:
        customised = {"system_prompt": bool(self.system_prompt),
                      "messages_to_prompt": self.messages_to_prompt is not generic_messages_to_prompt,
                      "completion_to_prompt": self.completion_to_prompt is not default_completion_to_prompt}
        ignored = [name for name, changed in customised.items() if changed]
        if ignored:
            warnings.warn(f"KVPacketLLM ignores {', '.join(ignored)} when answering through packets: the prompt is the "
                          "engine's cached preamble, the packets and the question. Set the system prompt with "
                          "KVPacketLLM(engine=PacketEngine(system_prompt=...)) instead.", UserWarning, stacklevel=3)

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
        for last in self._completions(prompt, formatted, **kwargs):
            pass
        assert last is not None
        return CompletionResponse(text=last.text, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the completion of ``prompt``; with ``nodes=`` answer it through the nodes' packets.

        With nodes, every response carries ``additional_kwargs["kvpacket"]`` (closed_book, packet keys; timings
        once the stream ends).
        """
        return self._completions(prompt, formatted, **kwargs)

    def _completions(self, prompt: str, formatted: bool, **kwargs: Any) -> CompletionResponseGen:
        nodes = kwargs.pop("nodes", None)
        history = kwargs.pop("history", ())
        if nodes is not None:
            return self._stream_packets(self.stream_nodes(prompt, nodes, history, **kwargs))
        return self._stream_plain(self._prompt_messages(prompt, formatted), **kwargs)

    def _stream_packets(self, stream: RAGAnswerStream) -> CompletionResponseGen:
        info: dict = {"kvpacket": {"closed_book": stream.closed_book}}
        text = ""
        for piece in _closing(stream):
            text += piece
            yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
        raw = usage_raw(stream.result.answer, stream.result)
        info["kvpacket"] = raw["kvpacket"]
        yield CompletionResponse(text=text, delta="", additional_kwargs=info, raw=raw)

    def _stream_plain(self, messages: list[tuple[str, str]], **kwargs: Any) -> CompletionResponseGen:
        stream: AnswerStream = self.engine.chat(messages, self.generation(**kwargs))
        info: dict = {"kvpacket": {"closed_book": None}}
        text = ""
        for piece in _closing(stream):
            text += piece
            yield CompletionResponse(text=text, delta=piece, additional_kwargs=info)
        if looks_like_pasted_documents(messages[-1][1], stream.answer.question_tokens):
            warnings.warn("KVPacketLLM got documents pasted into the prompt: they ran through the model in full, "
                          "with no packets and no speedup. Use as_kvpacket_query_engine(index, llm) or "
                          "KVPacketChatEngine, or pass the retrieved nodes with nodes=...", UserWarning, stacklevel=2)
        raw = usage_raw(stream.answer)
        info["kvpacket"] = raw["kvpacket"]
        yield CompletionResponse(text=text, delta="", additional_kwargs=info, raw=raw)

    # ---- chat -------------------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Reply to ``messages``; with ``nodes=`` answer the last user message through the nodes' packets,
        earlier turns following the packets in the prompt (with ``session=``, a `kvpacket_rag.ChatSession` or a
        session id, earlier turns come from the conversation's kept cache, see `stream_nodes`)."""
        last = None
        for last in self._chats(messages, **kwargs):
            pass
        assert last is not None
        return ChatResponse(message=last.message, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Streaming `chat`."""
        return self._chats(messages, **kwargs)

    def _chats(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        nodes = kwargs.pop("nodes", None)
        session = kwargs.pop("session", None)
        if nodes is not None:
            question, history = split_chat(messages)
            completions = self._stream_packets(self.stream_nodes(question, nodes, history, session, **kwargs))
        else:
            completions = self._stream_plain(self._chat_messages(messages), **kwargs)
        return _as_chat(completions)

    # ---- async: the model runs in a worker thread, the event loop stays free ---------------------------------

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """`complete` without blocking the event loop."""
        last = await _last(iterate_in_thread(lambda: self._completions(prompt, formatted, **kwargs)))
        return CompletionResponse(text=last.text, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any
                               ) -> CompletionResponseAsyncGen:
        """`stream_complete` without blocking the event loop; stopping early stops the generation."""
        return iterate_in_thread(lambda: self._completions(prompt, formatted, **kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """`chat` without blocking the event loop."""
        last = await _last(iterate_in_thread(lambda: self._chats(messages, **kwargs)))
        return ChatResponse(message=last.message, additional_kwargs=last.additional_kwargs, raw=last.raw)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """`stream_chat` without blocking the event loop; stopping early stops the generation."""
        return iterate_in_thread(lambda: self._chats(messages, **kwargs))

    def _chat_messages(self, messages: Sequence[ChatMessage]) -> list[tuple[str, str]]:
        system = []
        if self.system_prompt and not any(m.role == MessageRole.SYSTEM for m in messages):
            system.append(("system", self.system_prompt))
        return system + _pairs(messages)


def _closing(stream: AnswerStream | RAGAnswerStream) -> Iterator[str]:
    """The stream's pieces; a consumer that stops early stops the generation at once."""
    try:
        yield from stream
    finally:
        stream.close()


async def _last(responses: AsyncIterator[Any]) -> Any:
    last = None
    async with aclosing(responses):
        async for last in responses:
            pass
    assert last is not None
    return last


def _as_chat(completions: Iterator[CompletionResponse]) -> ChatResponseGen:
    for completion in completions:
        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=completion.text),
                           delta=completion.delta, additional_kwargs=completion.additional_kwargs, raw=completion.raw)
