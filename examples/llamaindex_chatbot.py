"""A LlamaIndex chatbot over FAISS whose answers come from precomputed KV packets.

Run: ``python examples/llamaindex_chatbot.py`` (the notebook llamaindex_chatbot.ipynb holds the same cells).
Set ``KVPACKET_EXAMPLE_FAST=1`` for the short version the tests execute.
"""

# %% [markdown]
# # A LlamaIndex chatbot over FAISS, answered through KV packets
#
# Every retrieved chunk's attention cache (its *KV packet*) is computed once at ingestion and stored. At question
# time the packets of the retrieved chunks are loaded, moved to their positions and only the question runs
# through the model, so the time to first token no longer grows with the documents.
#
# This notebook uses the embedded defaults (SmolLM2-135M-Instruct and the MiniLM embedder): nothing is
# downloaded. The documents are the bundled demo corpus of `kvpacket demo`: short profiles of fictional
# companies and people.

# %%
import os

import faiss
import torch
from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter
from llama_index.llms.kvpacket import (KVPacketChatEngine, KVPacketEmbedding, KVPacketLLM, KVPacketTransform,
                                       as_kvpacket_query_engine)
from llama_index.vector_stores.faiss import FaissVectorStore

from kvpacket_rag import DEFAULT_MODEL, SHIPPED_ADAPTERS, PacketEngine, open_store
from kvpacket_rag.demo import CORPUS_DIR, suggested_questions
from kvpacket_rag.models import cache_dir

FAST = os.environ.get("KVPACKET_EXAMPLE_FAST") == "1"  # short run (tests)
if os.environ.get("KVPACKET_EXAMPLE_THREADS"):
    torch.set_num_threads(int(os.environ["KVPACKET_EXAMPLE_THREADS"]))

# %% [markdown]
# ## The model, its adapter and a packet store
#
# `PacketEngine` loads the model and the trained adapter (the soft header/trailer tokens that make
# independently computed packets work together). Packets go to a local directory store, so a second run
# of this notebook builds none.

# %%
# The shipped adapter of the default model; bare packets (lower quality) if this checkout has none yet.
adapter = "default" if SHIPPED_ADAPTERS[DEFAULT_MODEL].is_file() else None
store = open_store(cache_dir() / "examples" / "packets")
engine = PacketEngine(adapter=adapter, store=store)
llm = KVPacketLLM(engine, max_new_tokens=48)
embed_model = KVPacketEmbedding()  # offline all-MiniLM-L6-v2, 384-d unit vectors
print(engine.model.name, "| adapter:", adapter or "none (bare packets)", "| store:", store)

# %% [markdown]
# ## Ingestion: split, build packets, embed
#
# `KVPacketTransform` builds each node's packet and records its key in the node's metadata (hidden from
# the embedder and prompts). Packets already in the store are reused.

# %%
documents = SimpleDirectoryReader(str(CORPUS_DIR), required_exts=[".txt"]).load_data()
pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=256), KVPacketTransform(llm), embed_model])
nodes = pipeline.run(documents=documents)
print(f"{len(documents)} documents -> {len(nodes)} nodes; {store.stats()['packets']} packets in the store")

# %% [markdown]
# ## A FAISS vector index and a streaming query engine

# %%
vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(embed_model.embedder.dim))
index = VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=vector_store),
                         embed_model=embed_model)
query_engine = as_kvpacket_query_engine(index, llm, similarity_top_k=3, streaming=True)

questions = [q.question for q in suggested_questions()][: 1 if FAST else 3]
for question in questions:
    print("Q:", question)
    response = query_engine.query(question)
    print("A: ", end="")
    response.print_response_stream()
    timings = response.metadata["kvpacket"]["timings"]
    sources = [f"{n.node.metadata['file_name']} ({n.score:.2f})" for n in response.source_nodes]
    print(f"\n   sources: {', '.join(sources)}\n   time to first token: {timings['ttft_s'] * 1000:.0f} ms\n")

# %% [markdown]
# ## Packets versus full recompute
#
# The same retrieved chunks, answered by running them through the model again (the usual RAG path).
# The answers should agree; the packet path forwards only the question.

# %%
chunks = [n.node.get_content() for n in response.source_nodes]
for method in ("kv_packet_first_exact", "full_recompute"):
    answer = engine.answer(questions[-1], chunks, method=method)
    print(f"{method:15s} TTFT {answer.timings['ttft_s'] * 1000:6.0f} ms, {answer.forwarded_tokens:4d} tokens "
          f"forwarded: {answer.text}")

# %% [markdown]
# ## Multi-turn chat
#
# `KVPacketChatEngine` retrieves for each message; earlier turns go after the packets, so the packets stay
# reusable across turns, and the conversation's cache is kept (a chat session): a turn that retrieves the same
# nodes forwards only its new message.

# %%
chat = KVPacketChatEngine.from_index(index, llm, similarity_top_k=3)
for message in ["Who is the coach of Kaito Brennan?", "Where was Kaito Brennan born?"]:
    print("You:", message)
    reply = chat.stream_chat(message)
    print("Bot: ", end="")
    reply.print_response_stream()
    print()

# %% [end]
