"""Scale-out over one Redis store: two worker processes, the second answering from the packets the first built.

Run: ``python examples/redis_workers.py`` (starts a private ``redis-server`` on a free loopback port), or
``python examples/redis_workers.py --redis-url redis://host:6379/0`` to use a running server.
Set ``KVPACKET_EXAMPLE_FAST=1`` for the short version the tests execute.

Each worker is its own process with its own `PacketEngine` (model, adapter) over the same Redis store.
Worker 1 ingests the bundled corpus: it builds and stores one packet per chunk. Worker 2 starts afterwards,
reads every packet worker 1 built (it builds none) and answers the suggested questions through them.
The script exits with status 1 if worker 2 had to build anything.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

FAST = os.environ.get("KVPACKET_EXAMPLE_FAST") == "1"  # short run (tests)
PREFIX = "kvpacket-example:"


def corpus_chunks() -> tuple[list[str], dict[str, list[str]]]:
    """Chunk texts of the bundled corpus (fewer documents when FAST), and the chunks of each document."""
    from kvpacket_rag.chunker import Chunker
    from kvpacket_rag.demo import load_corpus, suggested_questions
    from kvpacket_rag.models import default_model_dir
    from transformers import AutoTokenizer

    chunker = Chunker(AutoTokenizer.from_pretrained(default_model_dir()), chunk_tokens=128)
    documents = load_corpus()
    if FAST:  # the documents of the first two suggested questions
        sources = {q.source for q in suggested_questions()[:2]}
        documents = [doc for doc in documents if doc.doc_id in sources]
    by_document = {doc.doc_id: [chunk.text for chunk in chunker.split(doc.text)] for doc in documents}
    return [text for chunks in by_document.values() for text in chunks], by_document


def make_engine(url: str):
    """One worker's engine: the embedded model and its shipped adapter, packets in Redis."""
    import torch

    from kvpacket_rag import PacketEngine, open_store

    torch.set_num_threads(int(os.environ.get("KVPACKET_EXAMPLE_THREADS", "2")))
    return PacketEngine(store=open_store(url, prefix=PREFIX))


def ingest(url: str) -> dict:
    """Worker 1: build and store the packets of every chunk (its adapter packet and its exact packet)."""
    engine = make_engine(url)
    chunks, _ = corpus_chunks()
    start = time.perf_counter()
    keys = engine.ingest_packets(chunks)
    return {"pid": os.getpid(), "chunks": len(chunks), "keys": len(set(keys)),
            "built": engine.counters["packets_built"], "seconds": time.perf_counter() - start}


def answer(url: str) -> dict:
    """Worker 2: read every packet worker 1 built, then answer suggested questions through them."""
    from kvpacket_rag import GenerationConfig
    from kvpacket_rag.demo import suggested_questions

    engine = make_engine(url)
    chunks, by_document = corpus_chunks()
    start = time.perf_counter()
    fetched = engine.packets_for(chunks)
    read_s = time.perf_counter() - start
    replies = []
    for suggestion in [q for q in suggested_questions() if q.source in by_document][:2 if FAST else 4]:
        reply = engine.answer(suggestion.question, by_document[suggestion.source],
                              generation=GenerationConfig(max_new_tokens=32))
        replies.append((suggestion.question, reply.text.strip(), reply.timings["ttft_s"]))
    return {"pid": os.getpid(), "read": len(fetched.packets), "built": engine.counters["packets_built"],
            "read_s": read_s, "replies": replies}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def private_redis() -> Iterator[str]:
    """A throw-away redis-server on a free loopback port (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: install it (apt-get install redis-server) or pass --redis-url")
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            sys.exit(f"redis-server did not start on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(timeout=10)


def run_in_process(work, url: str) -> dict:
    """Run ``work(url)`` in a fresh worker process (spawned: nothing is inherited but the arguments)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(work, (url,))


def main(url: str) -> int:
    first = run_in_process(ingest, url)
    print(f"worker 1 (pid {first['pid']}): built {first['built']} packets for {first['chunks']} chunks "
          f"in {first['seconds']:.1f} s")
    second = run_in_process(answer, url)
    print(f"worker 2 (pid {second['pid']}): read {second['read']} packets in {second['read_s'] * 1000:.0f} ms, "
          f"built {second['built']}")
    for question, text, ttft in second["replies"]:
        print(f"  Q: {question}\n  A: {text}   (TTFT {ttft * 1000:.0f} ms)")
    ok = second["built"] == 0 and second["read"] == first["chunks"]
    print("worker 2 read every packet worker 1 built" if ok else "worker 2 had to build packets")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("KVPACKET_REDIS_URL"),
                        help="a running Redis server (default: start a private redis-server)")
    url = parser.parse_args().redis_url
    if url:
        sys.exit(main(url))
    with private_redis() as url:
        sys.exit(main(url))
