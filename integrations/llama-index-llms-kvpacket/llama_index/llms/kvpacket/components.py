"""Ingestion, retrieval and synthesis pieces that route a LlamaIndex RAG app through KV packets.

- `KVPacketTransform`: an ingestion transformation; builds each node's packet, records ``packet_key``.
- `KVPacketNodePostprocessor`: attaches (and if needed builds) packets for retrieved nodes.
- `KVPacketSynthesizer`: a response synthesizer answering through the nodes' packets (streaming too).
- `as_kvpacket_query_engine(index, llm)`: ``index.as_query_engine`` wired with the two above.
- `KVPacketChatEngine`: multi-turn chat; earlier turns follow the packets, packets are reused across turns, and
  while the retrieved nodes stay the same each turn forwards only its new message (a chat session).
- `KVPacketEmbedding`: the offline MiniLM embedder as a LlamaIndex embedding model.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any, Generator, List, Optional, Sequence

from kvpacket_rag import ChatSession, ChatTurn, Embedder
from kvpacket_rag.aio import iterate_in_thread
from kvpacket_rag.rag import PACKET_KEY, ensure_packets
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole
from llama_index.core.base.response.schema import (RESPONSE_TYPE, AsyncStreamingResponse, Response,
                                                   StreamingResponse)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine, StreamingAgentChatResponse
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TransformComponent

from .base import KVPacketLLM, node_text, usage_raw


def _mark_packet(node: BaseNode, key: str) -> None:
    """Record ``key`` on the node, hidden from embeddings and from LLM prompts (so content stays stable)."""
    node.metadata[PACKET_KEY] = key
    for excluded in (node.excluded_embed_metadata_keys, node.excluded_llm_metadata_keys):
        if PACKET_KEY not in excluded:
            excluded.append(PACKET_KEY)


class KVPacketTransform(TransformComponent):
    """Ingestion step: build the packet of every node into the LLM's store and record ``packet_key`` metadata.

    Place it after the node parser (and before or after the embedding model) in an ``IngestionPipeline``.
    Packets already stored are not rebuilt (content addressed).

    Args:
        llm: the `KVPacketLLM` that will answer (its engine's model, adapter and store are used).
    """

    packet_namespace: str = Field(default="", description="Model and adapter fingerprints (part of the cache hash).")
    metadata_mode: MetadataMode = Field(default=MetadataMode.NONE)
    _llm: KVPacketLLM = PrivateAttr()

    def __init__(self, llm: KVPacketLLM, **kwargs: Any) -> None:
        engine = llm.engine
        kwargs.setdefault("packet_namespace", f"{engine.model.fingerprint[:16]}/{engine.adapter.fingerprint[:16]}")
        kwargs.setdefault("metadata_mode", llm.metadata_mode)
        super().__init__(**kwargs)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "KVPacketTransform"

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        texts = [node_text(node, self.metadata_mode) for node in nodes]
        unique = list(dict.fromkeys(texts))
        progress = kwargs.get("show_progress", False)
        key_of = dict(zip(unique, self._llm.engine.ingest_packets(unique, progress=progress)))
        for node, text in zip(nodes, texts):
            _mark_packet(node, key_of[text])
        return nodes


class KVPacketNodePostprocessor(BaseNodePostprocessor):
    """Attach packets to retrieved nodes: checks each node's ``packet_key`` and builds missing packets.

    Use it last in ``node_postprocessors`` (after rerankers and filters), so only the final nodes get packets.
    Follows the LLM's ``missing_packets`` policy (``build`` or ``error``).
    """

    _llm: KVPacketLLM = PrivateAttr()

    def __init__(self, llm: KVPacketLLM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._llm = llm

    @classmethod
    def class_name(cls) -> str:
        return "KVPacketNodePostprocessor"

    def _postprocess_nodes(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle] = None
                           ) -> List[NodeWithScore]:
        texts = [node_text(n, self._llm.metadata_mode) for n in nodes]
        recorded = [n.node.metadata.get(PACKET_KEY) for n in nodes]
        keys = ensure_packets(self._llm.engine, texts, recorded, self._llm.missing_packets)
        for node, key in zip(nodes, keys):
            _mark_packet(node.node, key)
        return nodes


class KVPacketSynthesizer(BaseSynthesizer):
    """Response synthesizer that answers through the retrieved nodes' packets (no prompt template).

    Nodes enter the context in the order given (retrievers give best first). With no nodes the query is
    answered closed-book. ``response.metadata["kvpacket"]`` holds ``closed_book``, ``packet_keys`` and
    ``timings`` (for streaming responses, filled once the stream ends).

    Args:
        llm: the `KVPacketLLM`.
        streaming: return `StreamingResponse` objects.
        history: earlier turns placed after the packets (see `KVPacketChatEngine` for chat).
    """

    def __init__(self, llm: KVPacketLLM, streaming: bool = False, history: Sequence[ChatTurn] = (),
                 **kwargs: Any) -> None:
        if not isinstance(llm, KVPacketLLM):
            raise TypeError(f"KVPacketSynthesizer needs a KVPacketLLM, got {type(llm).__name__}")
        super().__init__(llm=llm, streaming=streaming, **kwargs)
        self._kv_llm = llm
        self.history = tuple(history)

    def _get_prompts(self) -> dict:
        return {}

    def _update_prompts(self, prompts_dict: dict) -> None:
        """No prompt templates: the packets and the engine's chat preamble are the prompt."""
        if prompts_dict:
            warnings.warn(f"KVPacketSynthesizer ignores the prompt templates {sorted(prompts_dict)}: the prompt is the "
                          "engine's cached preamble, the packets and the question. Set the system prompt with "
                          "PacketEngine(system_prompt=...) instead.", UserWarning, stacklevel=3)

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """Answer over plain text chunks (packets built on demand); a generator when streaming."""
        stream = self._kv_llm.stream_nodes(query_str, [BaseNodeText(text) for text in text_chunks], self.history,
                                           **response_kwargs)
        return iter(stream) if self._streaming else stream.collect().text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any):
        """`get_response` off the event loop; an async generator when streaming."""
        if self._streaming:
            return iterate_in_thread(lambda: self.get_response(query_str, text_chunks, **response_kwargs))
        return await asyncio.to_thread(self.get_response, query_str, text_chunks, **response_kwargs)

    def synthesize(self, query, nodes: List[NodeWithScore], additional_source_nodes=None,
                   **response_kwargs: Any) -> RESPONSE_TYPE:
        """Answer through the nodes' packets, emitting a SYNTHESIZE event around an LLM event (whose completion
        carries the token usage) on the callback manager."""
        query_str = query.query_str if isinstance(query, QueryBundle) else str(query)
        callbacks = self._callback_manager
        synthesize_id = callbacks.on_event_start(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_str})
        llm_id = callbacks.on_event_start(CBEventType.LLM, payload={EventPayload.PROMPT: query_str,
                                                                    EventPayload.SERIALIZED: self._kv_llm.to_dict()})
        stream = self._kv_llm.stream_nodes(query_str, nodes, self.history, **response_kwargs)
        sources = list(nodes) + list(additional_source_nodes or [])
        metadata = {n.node.node_id: n.node.metadata for n in sources}
        metadata["kvpacket"] = {"closed_book": stream.closed_book}

        def finish(response) -> None:
            raw = usage_raw(stream.result.answer, stream.result)
            metadata["kvpacket"] = raw["kvpacket"]
            completion = CompletionResponse(text=stream.result.text, raw=raw)
            callbacks.on_event_end(CBEventType.LLM, payload={EventPayload.PROMPT: query_str,
                                                             EventPayload.COMPLETION: completion}, event_id=llm_id)
            callbacks.on_event_end(CBEventType.SYNTHESIZE, payload={EventPayload.RESPONSE: response},
                                   event_id=synthesize_id)

        if not self._streaming:
            result = stream.collect()
            response = Response(result.text, source_nodes=sources, metadata=metadata)
            finish(response)
            return response

        def pieces() -> Generator[str, None, None]:
            yield from stream
            finish(response)

        response = StreamingResponse(pieces(), source_nodes=sources, metadata=metadata)
        return response

    async def asynthesize(self, query, nodes: List[NodeWithScore], additional_source_nodes=None,
                          **response_kwargs: Any) -> RESPONSE_TYPE:
        response = await asyncio.to_thread(self.synthesize, query, nodes, additional_source_nodes, **response_kwargs)
        if isinstance(response, StreamingResponse):
            return AsyncStreamingResponse(iterate_in_thread(lambda: response.response_gen),
                                          source_nodes=response.source_nodes, metadata=response.metadata)
        return response


class BaseNodeText:
    """A minimal stand-in for a node holding only text (used by `KVPacketSynthesizer.get_response`)."""

    def __init__(self, text: str):
        self.text = text
        self.metadata: dict = {}

    def get_content(self, metadata_mode: MetadataMode = MetadataMode.NONE) -> str:
        return self.text


def as_kvpacket_query_engine(index, llm: KVPacketLLM, streaming: bool = False, similarity_top_k: int = 4,
                             node_postprocessors: Sequence[BaseNodePostprocessor] = (), **kwargs: Any):
    """``index.as_query_engine(...)`` answering through packets.

    Args:
        index: any LlamaIndex index with ``as_query_engine`` (e.g. ``VectorStoreIndex`` over FAISS or in memory).
        llm: the `KVPacketLLM`.
        streaming: stream responses (``response.response_gen``).
        similarity_top_k: nodes to retrieve.
        node_postprocessors: run before the packet postprocessor (rerankers, similarity cut-offs, ...).
        kwargs: passed to ``index.as_query_engine`` (``callback_manager`` goes to the synthesizer, whose
            LLM and SYNTHESIZE events carry the token usage); prompt templates (``text_qa_template``, ...) do not
            apply to the packet path and are dropped with a warning.
    """
    templates = [name for name in kwargs if name.endswith("_template")]
    if templates:
        warnings.warn(f"as_kvpacket_query_engine ignores {', '.join(templates)}: the prompt is the engine's cached "
                      "preamble, the packets and the question. Set the system prompt with "
                      "PacketEngine(system_prompt=...) instead.", UserWarning, stacklevel=2)
        kwargs = {name: value for name, value in kwargs.items() if name not in templates}
    synthesizer = KVPacketSynthesizer(llm, streaming=streaming, callback_manager=kwargs.pop("callback_manager", None))
    return index.as_query_engine(
        llm=llm, similarity_top_k=similarity_top_k, response_synthesizer=synthesizer,
        node_postprocessors=[*node_postprocessors, KVPacketNodePostprocessor(llm)], **kwargs)


class KVPacketChatEngine(BaseChatEngine):
    """Retrieval chat: each user message retrieves nodes; the answer goes through their packets, with the
    conversation so far placed after the packets. Follow-ups retrieving the same nodes reuse their packets and the
    conversation's kept cache (a `kvpacket_rag.ChatSession`): only the new message is forwarded. Other nodes
    reassemble the conversation over their packets.

    Args:
        retriever: any LlamaIndex retriever (``index.as_retriever(similarity_top_k=k)``).
        llm: the `KVPacketLLM`.
        node_postprocessors: applied before the packet postprocessor.
        chat_history: earlier messages to start from.
    """

    def __init__(self, retriever: BaseRetriever, llm: KVPacketLLM,
                 node_postprocessors: Sequence[BaseNodePostprocessor] = (),
                 chat_history: Optional[List[ChatMessage]] = None) -> None:
        self._retriever = retriever
        self._llm = llm
        self._postprocessors = [*node_postprocessors, KVPacketNodePostprocessor(llm)]
        self._history: List[ChatMessage] = list(chat_history or [])
        self._session: Optional[ChatSession] = None

    @classmethod
    def from_index(cls, index, llm: KVPacketLLM, similarity_top_k: int = 4, **kwargs: Any) -> "KVPacketChatEngine":
        return cls(index.as_retriever(similarity_top_k=similarity_top_k), llm, **kwargs)

    @property
    def chat_history(self) -> List[ChatMessage]:
        return list(self._history)

    @property
    def session(self) -> ChatSession:
        """The chat session whose kept cache serves this conversation."""
        if self._session is None:
            self._session = self._llm.engine.session()
        return self._session

    def reset(self) -> None:
        self._history = []
        self.session.reset()

    def _nodes(self, message: str) -> List[NodeWithScore]:
        nodes = self._retriever.retrieve(message)
        bundle = QueryBundle(message)
        for postprocessor in self._postprocessors:
            nodes = postprocessor.postprocess_nodes(nodes, query_bundle=bundle)
        return nodes

    def _start(self, message: str, chat_history: Optional[List[ChatMessage]]):
        if chat_history is not None:
            self._history = list(chat_history)
        nodes = self._nodes(message)
        messages = [*self._history, ChatMessage(role=MessageRole.USER, content=message)]
        return nodes, messages

    def _finish(self, message: str, answer: str) -> None:
        self._history += [ChatMessage(role=MessageRole.USER, content=message),
                          ChatMessage(role=MessageRole.ASSISTANT, content=answer)]

    def chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        nodes, messages = self._start(message, chat_history)
        reply = self._llm.chat(messages, nodes=nodes, session=self.session)
        self._finish(message, reply.message.content or "")
        return AgentChatResponse(response=reply.message.content or "", source_nodes=nodes,
                                 metadata=reply.additional_kwargs)

    def stream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                    ) -> StreamingAgentChatResponse:
        nodes, messages = self._start(message, chat_history)
        replies = self._llm.stream_chat(messages, nodes=nodes, session=self.session)

        def stream() -> Generator[ChatResponse, None, None]:
            last = None
            for last in replies:
                yield last
            self._finish(message, last.message.content or "" if last is not None else "")

        return StreamingAgentChatResponse(chat_stream=stream(), source_nodes=nodes, is_writing_to_memory=False)

    async def achat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        return await asyncio.to_thread(self.chat, message, chat_history)

    async def astream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                           ) -> StreamingAgentChatResponse:
        response = await asyncio.to_thread(self.stream_chat, message, chat_history)
        return StreamingAgentChatResponse(achat_stream=iterate_in_thread(lambda: response.chat_stream),
                                          source_nodes=response.source_nodes, is_writing_to_memory=False)


class KVPacketEmbedding(BaseEmbedding):
    """A `kvpacket_rag.embedder.Embedder` (default: the offline MiniLM) as a LlamaIndex embedding model."""

    _embedder: Embedder = PrivateAttr()

    def __init__(self, embedder: Embedder | None = None, **kwargs: Any) -> None:
        embedder = embedder if embedder is not None else Embedder()
        kwargs.setdefault("model_name", embedder.name)
        super().__init__(**kwargs)
        self._embedder = embedder

    @classmethod
    def class_name(cls) -> str:
        return "KVPacketEmbedding"

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embedder.embed_query(query).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embedder.embed([text])[0].tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return self._embedder.embed(texts).tolist()
