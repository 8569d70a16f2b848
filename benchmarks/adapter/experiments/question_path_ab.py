"""A/B of the question path's last speed changes at 8 × 512, in one process, old and new swapped call by call.

"old" puts back the previous implementations (the boolean mask converted in every layer and a lone row's tokens
gathered by index; chunk token ids tokenized on every call); "new" is the package as it is. Interleaving the calls
keeps the VM's drift (±15 % between runs minutes apart) out of the comparison.

    python benchmarks/adapter/experiments/question_path_ab.py kv_packet_first_exact kv_packet_refresh:4 \
        kv_packet_refresh:8
"""
import statistics
import sys
import tempfile

import torch

import kvpacket_rag.batchcache as bc
import kvpacket_rag.prompt as prompt
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.benchmarks.ttft import make_chunks, QUESTION
from kvpacket_rag.store import open_store
torch.set_num_threads(2)

new_attend = bc.RowsAttention.attend


def old_attend(self, query, key, value, scaling, attention, pack_mask=None):
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])
    for group in self.groups:
        rows = slice(group.first, group.last)
        for slots, limit in group.segments:
            tokens, real = group.tokens[:, slots], group.real[:, slots]
            grouped = query[0][:, tokens].transpose(0, 1)
            result = attention(grouped, key[rows, :, :limit], value[rows, :, :limit],
                               group.mask[:, :, slots, :limit], scaling)
            out[tokens[real]] = result[real]
    return out[None]


new_chunk_ids = prompt.PromptFormatter.chunk_ids


def old_chunk_ids(self, text):
    return self._ids(text.strip() + "\n\n")


def setup(old):
    bc.RowsAttention.attend = old_attend if old else new_attend
    prompt.PromptFormatter.chunk_ids = old_chunk_ids if old else new_chunk_ids


engine = PacketEngine(None, adapter="none+preamble", store=open_store(tempfile.mkdtemp()), device="cpu")
chunks = make_chunks(engine, 8, 512)
g = GenerationConfig(max_new_tokens=1)
methods = sys.argv[1:]
for m in methods:
    engine.answer(QUESTION, chunks, method=m, generation=g)
R = {}
for rnd in range(8):
    for m in methods:
        for old in ((False, True) if rnd % 2 else (True, False)):
            setup(old)
            a = engine.answer(QUESTION, chunks, method=m, generation=g)
            R.setdefault((m, "old" if old else "new"), []).append(a.timings)
for (m, side), ts in sorted(R.items()):
    med = {k: round(statistics.median(t[k] for t in ts) * 1e3, 1)
           for k in ("packet_load_s", "assembly_s", "question_prefill_s", "ttft_s")}
    print(m, side, med)
