"""Needles in the best-ranked chunk, read exactly, and lost: the shipped default against bare packets.

On the 100 haystacks of `retrieval_order/niah100_retrieval_shipped.json` (NIAH 8 x 512, test split, seed 0, chunks
in retrieval order) the shipped default (`kv_packet_first_exact`) misses needles that full recompute finds, most of
them in the first chunk, which it reads from its exact packet. This probe answers the haystacks where the needle is
in the first chunk with three readings, greedy, 24 new tokens, and counts the needles found (`metrics.answer_recall`):

- the shipped adapter, `kv_packet_first_exact` (the default);
- the shipped adapter, `kv_packet` (every chunk from its adapted packet);
- no adapter, packets built after the chat preamble (`none+preamble`), `kv_packet_first_exact`: the first chunk
  exact, the others bare.

    python benchmarks/adapter/experiments/needle_first_probe.py --threads 2
"""
import argparse
import json

import torch

from kvpacket_rag.datasets import load_samples
from kvpacket_rag.embedder import Embedder
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.evaluation.harness import retrieval_order
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.metrics import answer_recall
from kvpacket_rag.models import load_model

READINGS = (("default", "kv_packet_first_exact"), ("default", "kv_packet"), ("none+preamble", "kv_packet_first_exact"))

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--result", default="benchmarks/adapter/experiments/retrieval_order/niah100_retrieval_shipped.json")
args = parser.parse_args()
torch.set_num_threads(args.threads)

samples = retrieval_order(load_samples("niah", "test", 100, 0), Embedder())
records = json.load(open(args.result))["methods"]["full_recompute"]["records"]
if [r["id"] for r in records] != [s.id for s in samples]:
    raise SystemExit(f"{args.result} holds other questions than NIAH's test split, seed 0, first 100")
first = [s for s, r in zip(samples, records) if r["recall"] and answer_recall(s.chunks[0], s.answers)]
print(f"{len(first)} haystacks with the needle in the best-ranked chunk, found by full recompute")
model = load_model()
generation = GenerationConfig(max_new_tokens=24)
for adapter, method in READINGS:
    engine = PacketEngine(model, adapter=adapter)
    found = int(sum(answer_recall(engine.answer(s.question, s.chunks, method, generation=generation).text, s.answers)
                    for s in first))
    print(f"adapter {adapter}, {method}: {found} of {len(first)} needles found")
