"""A LangChain chatbot that streams answers computed from precomputed KV packets.

Run: ``python examples/langchain_chatbot.py`` (the notebook langchain_chatbot.ipynb holds the same cells).
Set ``KVPACKET_EXAMPLE_FAST=1`` for the short version the tests execute.
"""

# %% [markdown]
# # A LangChain chatbot with streaming, answered through KV packets
#
# `ChatKVPacket` is a LangChain chat model. Given retrieved documents, it answers from their KV packets
# (computed once at ingestion) and runs only the question through the model. `create_kvpacket_rag_chain`
# wires any retriever to it as an LCEL chain that streams.
#
# Embedded defaults only (SmolLM2-135M-Instruct, MiniLM): nothing is downloaded. The documents are the
# bundled demo corpus: short profiles of fictional companies and people.

# %%
import os
import time

import torch
from langchain_core.documents import Document
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_kvpacket import (ChatKVPacket, KVPacketDocumentTransformer, KVPacketEmbeddings, PacketIndexRetriever,
                                create_kvpacket_rag_chain)

from kvpacket_rag import DEFAULT_MODEL, SHIPPED_ADAPTERS, PacketEngine, PacketIndex, open_store
from kvpacket_rag.demo import CORPUS_DIR, load_corpus, suggested_questions
from kvpacket_rag.models import cache_dir

FAST = os.environ.get("KVPACKET_EXAMPLE_FAST") == "1"  # short run (tests)
if os.environ.get("KVPACKET_EXAMPLE_THREADS"):
    torch.set_num_threads(int(os.environ["KVPACKET_EXAMPLE_THREADS"]))

# %% [markdown]
# ## The chat model
#
# A `PacketEngine` holds the model, the trained adapter and the packet store (a local directory here, so a
# second run builds no packet).

# %%
# The shipped adapter of the default model; bare packets (lower quality) if this checkout has none yet.
adapter = "default" if SHIPPED_ADAPTERS[DEFAULT_MODEL].is_file() else None
engine = PacketEngine(adapter=adapter, store=open_store(cache_dir() / "examples" / "packets"))
llm = ChatKVPacket(engine=engine, max_tokens=48)

# %% [markdown]
# ## Ingestion: build packets, then embed
#
# `KVPacketDocumentTransformer` builds every document's packet and records its `packet_key` in the
# metadata; any LangChain vector store can then hold the documents.

# %%
raw = [Document(page_content=(CORPUS_DIR / doc.doc_id).read_text(encoding="utf-8").strip(),
                metadata={"source": doc.doc_id}) for doc in load_corpus()]
started = time.perf_counter()
docs = KVPacketDocumentTransformer(llm).transform_documents(raw)
print(f"{len(docs)} documents with packets in {time.perf_counter() - started:.1f} s; "
      f"first key {docs[0].metadata['packet_key'][:16]}…")

vector_store = InMemoryVectorStore(KVPacketEmbeddings())
vector_store.add_documents(docs)
chain = create_kvpacket_rag_chain(vector_store.as_retriever(search_kwargs={"k": 3}), llm)

# %% [markdown]
# ## Streaming answers
#
# `chain.stream` yields message chunks as tokens are decoded; the last chunk carries the sources and the
# timings in `response_metadata["kvpacket"]`.

# %%
questions = [q.question for q in suggested_questions()][: 1 if FAST else 3]
for question in questions:
    print("Q:", question)
    print("A: ", end="", flush=True)
    info = {}
    for chunk in chain.stream(question):
        print(chunk.content, end="", flush=True)
        info = chunk.response_metadata.get("kvpacket", info)
    sources = ", ".join(source["source"] for source in info["sources"])
    print(f"\n   sources: {sources}\n   time to first token: {info['timings']['ttft_s'] * 1000:.0f} ms\n")

# %% [markdown]
# ## A follow-up question
#
# Pass the conversation as `chat_history`; earlier turns go after the packets in the prompt, so the same
# packets serve every turn. A `session_id` (one per conversation) keeps the conversation's cache between calls:
# while the retrieved documents stay the same, a turn forwards only its new message.

# %%
history = [("human", "Who is the coach of Kaito Brennan?"), ("ai", "The coach of Kaito Brennan is Emiko Sato.")]
print("A: ", end="")
for chunk in chain.stream({"question": "Where was Kaito Brennan born?", "chat_history": history,
                           "session_id": "conversation-1"}):
    print(chunk.content, end="", flush=True)
print()

# %% [markdown]
# ## The same chain over a `PacketIndex` (FAISS)
#
# `PacketIndex` keeps chunks, packets and a FAISS index together and can be saved and reopened without
# rebuilding anything; `PacketIndexRetriever` exposes it to LangChain.

# %%
index = PacketIndex(engine)
report = index.add_documents(load_corpus())
print(f"{report.packets_built} packets built, {report.packets_reused} reused from the store")
faiss_chain = create_kvpacket_rag_chain(PacketIndexRetriever(index=index, k=3), llm)
message = faiss_chain.invoke(questions[0])
print(message.content, "| sources:", [s["doc_id"] for s in message.response_metadata["kvpacket"]["sources"]])

# %% [markdown]
# ## The chat model on its own
#
# Without documents `ChatKVPacket` is an ordinary chat model; with `documents=` it answers through their packets.

# %%
print(llm.invoke("Say hello in French.").content)
retrieved = vector_store.similarity_search(questions[0], k=3)
print(llm.invoke(questions[0], documents=retrieved).content)

# %% [end]
