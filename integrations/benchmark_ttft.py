"""TTFT of LlamaIndex and LangChain RAG apps answering through KV packets vs the same apps on a plain
transformers LLM (the full prompt, documents included, runs through the model).

Same model weights, corpus, retrieval (MiniLM + FAISS), questions and clock for both; packets are built at
ingestion (not timed). TTFT runs from the framework call (query / stream) to the first streamed text,
retrieval included. Medians over ``--repeats`` runs of every question after one warm-up per app.

    python integrations/benchmark_ttft.py --threads 1 --out benchmarks/integrations/ttft

Writes ``OUT.json`` and ``OUT.md`` (command, machine, threads, date).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessageChunk, BaseMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.outputs import ChatGenerationChunk, ChatResult  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402
from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.base.llms.types import CompletionResponse, LLMMetadata  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.ingestion import IngestionPipeline  # noqa: E402
from llama_index.core.llms.callbacks import llm_completion_callback  # noqa: E402
from llama_index.core.llms.custom import CustomLLM  # noqa: E402
from llama_index.vector_stores.faiss import FaissVectorStore  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from kvpacket_rag import PacketAdapter, PacketEngine, load_model  # noqa: E402
from kvpacket_rag.benchmarks.common import machine_info, median, write_outputs  # noqa: E402
from kvpacket_rag.chunker import ChunkerConfig  # noqa: E402
from kvpacket_rag.embedder import Embedder  # noqa: E402
from kvpacket_rag.adapter import SHIPPED_ADAPTERS  # noqa: E402
from kvpacket_rag.index import Document as KVDocument  # noqa: E402
from kvpacket_rag.index import PacketIndex  # noqa: E402
from kvpacket_rag.store import InMemoryStore  # noqa: E402
from kvpacket_rag.tuning import set_threads, tune_malloc  # noqa: E402
from langchain_kvpacket import ChatKVPacket, PacketIndexRetriever, create_kvpacket_rag_chain  # noqa: E402
from llama_index.llms.kvpacket import (KVPacketEmbedding, KVPacketLLM, KVPacketTransform,  # noqa: E402
                                       as_kvpacket_query_engine)

DATA = Path(__file__).resolve().parent.parent / "kvpacket_rag" / "data"
QUESTIONS = ["Who founded Quill Press?", "Which company makes sodium-ion batteries?", "Where is Nimbus Air based?"]


def corpus(group: int) -> list[tuple[str, str]]:
    """``(doc_id, text)``: the bundled sample (and corpus, if present) files, ``group`` files per document."""
    files = sorted((DATA / "samples").glob("*.txt")) + sorted((DATA / "corpus").glob("*.txt"))
    texts = [f.read_text(encoding="utf-8").strip() for f in files]
    return [(f"doc{n // group:03d}", "\n\n".join(texts[n:n + group])) for n in range(0, len(texts), group)]


# ---- the plain transformers LLMs (full prompt through HF generate, streamed) ----------------------------------------


def hf_stream(model, tokenizer, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
    """Stream ``model.generate`` over the chat-templated ``messages`` (greedy)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=dict(
        **ids, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id))
    worker.start()
    for piece in streamer:
        if piece:
            yield piece
    worker.join()


class PlainTransformersLLM(CustomLLM):
    """LlamaIndex LLM on a transformers model: the formatted prompt becomes one user message."""

    max_new_tokens: int = 8
    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, model, tokenizer, **kwargs: Any):
        super().__init__(**kwargs)
        self._model, self._tokenizer = model, tokenizer

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._model.config.max_position_embeddings, num_output=self.max_new_tokens,
                           model_name="plain-transformers")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="".join(self._pieces(prompt)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        text = ""
        for piece in self._pieces(prompt):
            text += piece
            yield CompletionResponse(text=text, delta=piece)

    def _pieces(self, prompt: str) -> Iterator[str]:
        return hf_stream(self._model, self._tokenizer, [{"role": "user", "content": prompt}], self.max_new_tokens)


class PlainTransformersChat(BaseChatModel):
    """LangChain chat model on a transformers model (whole conversation through ``generate``)."""

    hf_model: Any
    hf_tokenizer: Any
    max_new_tokens: int = 8

    @property
    def _llm_type(self) -> str:
        return "plain-transformers"

    def _messages(self, messages: list[BaseMessage]) -> list[dict]:
        roles = {"system": "system", "human": "user", "ai": "assistant"}
        return [{"role": roles[m.type], "content": m.content} for m in messages]

    def _stream(self, messages, stop=None, run_manager=None, **kwargs) -> Iterator[ChatGenerationChunk]:
        for piece in hf_stream(self.hf_model, self.hf_tokenizer, self._messages(messages), self.max_new_tokens):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))

    def _generate(self, messages, stop=None, run_manager=None, **kwargs) -> ChatResult:
        from langchain_core.messages import AIMessage
        from langchain_core.outputs import ChatGeneration

        text = "".join(c.message.content for c in self._stream(messages))
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


# ---- timing -------------------------------------------------------------------------------------------------------


def first_piece(pieces: Iterator[str], start: float) -> float:
    """Seconds from ``start`` to the first non-empty piece; drains the rest."""
    ttft = None
    for piece in pieces:
        if ttft is None and piece:
            ttft = time.perf_counter() - start
    return ttft if ttft is not None else float("nan")


def llama_ttft(query_engine, question: str) -> float:
    start = time.perf_counter()
    return first_piece(query_engine.query(question).response_gen, start)


def langchain_ttft(chain, question: str) -> float:
    start = time.perf_counter()
    return first_piece((c if isinstance(c, str) else c.content for c in chain.stream(question)), start)


def measure(run, apps: dict, repeats: int) -> dict:
    """Median TTFT per app; apps alternate call by call so load changes on a shared machine hit them alike."""
    for app in apps.values():  # warm-up
        for question in QUESTIONS:
            run(app, question)
    runs: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(repeats):
        for question in QUESTIONS:
            for name, app in apps.items():
                runs[name].append(run(app, question))
    return {name: {"ttft_s": median(values), "runs_s": values} for name, values in runs.items()}


def build_apps(args, engine: PacketEngine, embedder: Embedder, docs: list[tuple[str, str]]) -> dict:
    model, tokenizer = engine.model.model, engine.model.tokenizer
    k, tokens = args.k, args.max_new_tokens
    # LlamaIndex: one FAISS vector index, ingested with the packet step; two query engines over it
    llm = KVPacketLLM(engine, max_new_tokens=tokens)
    embed_model = KVPacketEmbedding(embedder)
    nodes = IngestionPipeline(transformations=[KVPacketTransform(llm), embed_model]).run(
        documents=[Document(text=text, doc_id=doc_id) for doc_id, text in docs])
    store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(embedder.dim))
    index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store),
                             embed_model=embed_model)
    plain_llm = PlainTransformersLLM(model, tokenizer, max_new_tokens=tokens)
    # LangChain: one PacketIndex (MiniLM + FAISS) retriever; the packet chain and a classic LCEL RAG chain
    packet_index = PacketIndex(engine, embedder, ChunkerConfig(chunk_tokens=args.chunk_tokens))
    packet_index.add_documents([KVDocument(text, doc_id) for doc_id, text in docs])
    retriever = PacketIndexRetriever(index=packet_index, k=k)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "You answer questions using the documents in the user's message. Reply with a short answer only."),
        ("human", "{context}\n\nQuestion: {question}")])
    plain_chain = ({"context": retriever | (lambda ds: "\n\n".join(d.page_content for d in ds)),
                    "question": RunnablePassthrough()}
                   | prompt | PlainTransformersChat(hf_model=model, hf_tokenizer=tokenizer, max_new_tokens=tokens)
                   | StrOutputParser())
    return {
        "llamaindex": {"kv_packet": as_kvpacket_query_engine(index, llm, streaming=True, similarity_top_k=k),
                       "plain_transformers": index.as_query_engine(llm=plain_llm, streaming=True,
                                                                   similarity_top_k=k)},
        "langchain": {"kv_packet": create_kvpacket_rag_chain(retriever, ChatKVPacket(engine=engine, max_tokens=tokens)),
                      "plain_transformers": plain_chain},
        "chunks": len(nodes), "context_tokens": _context_tokens(packet_index, k),
    }


def _context_tokens(index: PacketIndex, k: int) -> int:
    return int(median([sum(h.chunk.n_tokens for h in index.search(q, k)) for q in QUESTIONS]))


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Framework TTFT through KV packets vs a plain transformers LLM (full prompt), {result['model']} "
             f"(float32, CPU), {m['threads']} thread(s), {m['cpu']}, {m['date']}",
             f"command: `{m['command']}`",
             f"corpus: {result['documents']} documents ({result['chunks']} chunks), top-{result['k']} retrieval "
             f"(~{result['context_tokens']} chunk tokens in context), {len(QUESTIONS)} questions x {result['repeats']} "
             f"repeats (apps interleaved), median; adapter {result['adapter']}; store {result['store']}", "",
             "| framework | plain transformers TTFT | kv_packet TTFT | speedup |", "|---|---|---|---|"]
    for name in ("llamaindex", "langchain"):
        row = result["frameworks"][name]
        lines.append(f"| {name} | {row['plain_transformers']['ttft_s'] * 1e3:.0f} ms | "
                     f"{row['kv_packet']['ttft_s'] * 1e3:.0f} ms | {row['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--k", type=int, default=4, help="chunks retrieved per question")
    parser.add_argument("--group", type=int, default=6, help="bundled files joined into one document")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/integrations/ttft", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    tune_malloc()
    threads = set_threads(args.threads)
    model = load_model()
    shipped = SHIPPED_ADAPTERS.get(model.name)
    adapter = "default" if shipped is not None and shipped.is_file() else PacketAdapter.initialize(model, seed=0)
    engine = PacketEngine(model, adapter=adapter, store=InMemoryStore())
    embedder = Embedder()
    docs = corpus(args.group)
    apps = build_apps(args, engine, embedder, docs)
    frameworks = {}
    for name, run in (("llamaindex", llama_ttft), ("langchain", langchain_ttft)):
        rows = measure(run, apps[name], args.repeats)
        rows["speedup"] = rows["plain_transformers"]["ttft_s"] / rows["kv_packet"]["ttft_s"]
        frameworks[name] = rows
    result = {"model": engine.model.name, "adapter": "shipped" if adapter == "default" else "untrained (seed 0)",
              "store": type(engine.store).__name__, "documents": len(docs), "chunks": apps["chunks"],
              "context_tokens": apps["context_tokens"], "k": args.k, "repeats": args.repeats,
              "max_new_tokens": args.max_new_tokens, "questions": QUESTIONS, "frameworks": frameworks,
              "machine": {**machine_info(threads), "command": " ".join(["python", *sys.argv])}}
    write_outputs(result, table(result), args.out + ".json")
    return result


if __name__ == "__main__":
    main()
