"""Ingestion, retrieval and the LCEL chain that route a LangChain RAG app through KV packets.

- `KVPacketDocumentTransformer`: ingestion; optionally splits documents into token-aware chunks, builds each
  chunk's packet and records ``packet_key`` in its metadata.
- `KVPacketRetriever`: wraps any retriever; checks/attaches packet keys of the documents it returns.
- `PacketIndexRetriever`: retrieval from a `kvpacket_rag.index.PacketIndex` (FAISS), packets attached.
- `create_kvpacket_rag_chain(retriever, llm)`: question (+ chat history) -> retrieve -> answer through packets.
- `KVPacketEmbeddings`: the offline MiniLM embedder as LangChain embeddings.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvpacket_rag.chunker import Chunker, ChunkerConfig
from kvpacket_rag.embedder import Embedder
from kvpacket_rag.index import PacketIndex
from kvpacket_rag.rag import PACKET_KEY, ensure_packets
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import BaseDocumentTransformer, Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from pydantic import ConfigDict

from .chat_models import ChatKVPacket


def _with_key(document: Document, key: str, **extra: Any) -> Document:
    return Document(page_content=document.page_content, metadata={**document.metadata, **extra, PACKET_KEY: key},
                    id=document.id)


class KVPacketDocumentTransformer(BaseDocumentTransformer):
    """Ingestion step: build the packet of every document (chunk) and record ``packet_key`` in its metadata.

    Args:
        llm: the `ChatKVPacket` that will answer (its engine's model, adapter and store are used).
        chunk_tokens: if set, first split each document into chunks of at most this many model tokens at
            sentence boundaries (metadata copied, plus ``chunk``, ``start`` and ``end``); None keeps documents whole.
        overlap_tokens: sentence overlap between chunks when splitting.

    Packets already in the store are not rebuilt (content addressed). Returns new documents.
    """

    def __init__(self, llm: ChatKVPacket, chunk_tokens: int | None = None, overlap_tokens: int = 0):
        self.llm = llm
        self.chunker = (Chunker(llm.engine.model.tokenizer, config=ChunkerConfig(chunk_tokens, overlap_tokens))
                        if chunk_tokens else None)

    def _split(self, documents: Sequence[Document]) -> list[tuple[Document, dict]]:
        if self.chunker is None:
            return [(d, {}) for d in documents]
        return [(Document(page_content=c.text, metadata=d.metadata), {"chunk": n, "start": c.start, "end": c.end})
                for d in documents for n, c in enumerate(self.chunker.split(d.page_content))]

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        pieces = self._split(documents)
        texts = [d.page_content for d, _ in pieces]
        unique = list(dict.fromkeys(texts))
        key_of = dict(zip(unique, self.llm.engine.ingest_packets(unique)))
        return [_with_key(d, key_of[d.page_content], **extra) for d, extra in pieces]


class KVPacketRetriever(BaseRetriever):
    """Wraps any retriever: returned documents get a checked ``packet_key`` (missing packets built on demand,
    or an error, by the LLM's ``missing_packets`` policy)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    retriever: BaseRetriever
    llm: ChatKVPacket

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        documents = self.retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        keys = ensure_packets(self.llm.engine, [d.page_content for d in documents],
                              [d.metadata.get(PACKET_KEY) for d in documents], self.llm.missing_packets)
        return [_with_key(d, key) for d, key in zip(documents, keys)]


class PacketIndexRetriever(BaseRetriever):
    """Retrieval from a `PacketIndex` (MiniLM + FAISS): top-``k`` chunks as documents with ``packet_key``,
    ``doc_id``, ``chunk_id`` and ``score`` metadata (plus the document's metadata); ``invoke(query, k=n)``
    overrides ``k`` for one call."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    index: PacketIndex
    k: int = 4
    min_score: float | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        return [Document(page_content=hit.text, id=str(hit.chunk.chunk_id),
                         metadata={**hit.chunk.metadata, "doc_id": hit.chunk.doc_id, "chunk_id": hit.chunk.chunk_id,
                                   "score": hit.score, PACKET_KEY: hit.packet_key})
                for hit in self.index.search(query, k or self.k, self.min_score)]


def _normalise(inputs: Any) -> dict:
    if isinstance(inputs, str):
        return {"question": inputs, "chat_history": [], "session_id": None}
    if isinstance(inputs, dict) and isinstance(inputs.get("question"), str):
        return {"question": inputs["question"], "chat_history": _history(inputs.get("chat_history") or []),
                "session_id": inputs.get("session_id")}
    raise TypeError("the chain takes a question string or {'question': str, 'chat_history': [messages], "
                    "'session_id': str (optional)}")


def _history(items: Sequence[Any]) -> list[BaseMessage]:
    messages = []
    for item in items:
        if isinstance(item, BaseMessage):
            messages.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            role, content = item
            messages.append(HumanMessage(content) if role in ("human", "user") else AIMessage(content))
        else:
            raise TypeError(f"chat_history items must be messages or (role, content) pairs, got {item!r}")
    return messages


def create_kvpacket_rag_chain(retriever: BaseRetriever, llm: ChatKVPacket) -> Runnable:
    """LCEL chain: retrieve for the question, then answer it through the retrieved documents' packets.

    Input: a question string, or ``{"question": str, "chat_history": [messages or (role, text)], "session_id": str}``;
    earlier turns follow the packets in the prompt, so packets are reused across turns. With a ``session_id`` (one
    per conversation) the conversation's cache is kept between calls: while the retrieved documents stay the same,
    a turn forwards only its new message. Output: an ``AIMessage`` (streamed as
    ``AIMessageChunk``s) whose ``response_metadata["kvpacket"]`` holds ``closed_book``, ``packet_keys``,
    ``timings`` and the source documents' metadata (``sources``). Retrieval is run with the question alone.

    Args:
        retriever: any retriever (wrapped in `KVPacketRetriever` unless it already is one or a
            `PacketIndexRetriever`).
        llm: the `ChatKVPacket`.
    """
    if not isinstance(retriever, (KVPacketRetriever, PacketIndexRetriever)):
        retriever = KVPacketRetriever(retriever=retriever, llm=llm)

    def answer(inputs: dict) -> Runnable:
        messages = [*inputs["chat_history"], HumanMessage(inputs["question"])]
        bound = llm.bind(documents=inputs["documents"], session_id=inputs["session_id"])
        return RunnableLambda(lambda _: messages, name="conversation") | bound

    return (RunnableLambda(_normalise, name="inputs")
            | RunnablePassthrough.assign(documents=RunnableLambda(lambda x: x["question"]) | retriever)
            | RunnableLambda(answer, name="answer_through_packets")).with_config(run_name="kvpacket_rag")


class KVPacketEmbeddings(Embeddings):
    """A `kvpacket_rag.embedder.Embedder` (default: the offline MiniLM) as LangChain embeddings."""

    def __init__(self, embedder: Embedder | None = None):
        self.embedder = embedder if embedder is not None else Embedder()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embedder.embed(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embedder.embed_query(text).tolist()
