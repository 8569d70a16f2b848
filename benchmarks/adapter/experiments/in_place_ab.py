"""Interleaved A/B of a scheduler row that reads its packets where they lie against the assembled row.

Needs `in_place_reading.patch` applied to the package (``git apply
benchmarks/adapter/experiments/in_place_reading.patch``; the change was measured and not kept). One engine, 8 x 512
NIAH essay chunks, bare packets with the chat preamble, `kv_packet_first_exact`, one new token; the two readings
alternate call by call (16 calls each, the first 2 dropped), 2 threads, medians in ms.

    python benchmarks/adapter/experiments/in_place_ab.py
"""
import statistics

from kvpacket_rag import batchcache
from kvpacket_rag.benchmarks.ttft import QUESTION, make_chunks
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.tuning import set_threads, tune_malloc

set_threads(2)
tune_malloc()
engine = PacketEngine(adapter="none+preamble")
chunks = make_chunks(engine, 8, 512)
engine.build_packets(chunks)
generation = GenerationConfig(max_new_tokens=1)
readings = {"in_place": batchcache.RowBuffer.read_in_place, "assembled": lambda self, blocks, reserve: None}
timings = {name: [] for name in readings}
for call in range(16):
    for name, read in readings.items():
        batchcache.RowBuffer.read_in_place = read
        answer = engine.answer(QUESTION, chunks, method="kv_packet_first_exact", generation=generation)
        if call >= 2:
            timings[name].append(answer.timings)
for name, runs in timings.items():
    print(name, {key: round(statistics.median(run[key] for run in runs) * 1000, 1)
                 for key in ("assembly_s", "question_prefill_s", "ttft_s")})
