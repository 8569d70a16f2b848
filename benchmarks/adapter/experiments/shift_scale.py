"""Probe: scale the adapter's shift of each chunk's keys and values at question time, by the chunk's index.

A chunk's adapter packet differs from its exact packet (built plain after the chat preamble) by a shift that is
fixed when the packet is built, before anyone knows how many chunks precede it at question time. This probe reads
chunk ``i`` as ``exact + alpha_i * (adapted - exact)`` over the chunk's own positions (header and trailer as
stored), with ``alpha_0 = 0`` (the first chunk exact, as the default reading does). Both packets are already in the
store under the default method, so a reading like this costs no model forward. Training-free; teacher-forced
KL(full ‖ reading) per token on the cached full-recompute answers of the validation questions (test split, seed 1,
answers ≤ 32 tokens, written by ``evaluate_adapter.py``).

    python benchmarks/adapter/experiments/shift_scale.py --sets biography:5 --n 10 --threads 2 \\
        --readings 1 0.9 1.1 ramp:0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpacket_rag.benchmarks.common import machine_info
from kvpacket_rag.context import ContextMethod, PreparedContext
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.evaluation.teacher import continuation_logprobs, kl_per_token
from kvpacket_rag.kvcache import assemble
from kvpacket_rag.rope import rotate_keys
from kvpacket_rag.store import InMemoryStore
from kvpacket_rag.tuning import set_threads, tune_malloc


def alphas(reading: str, n_chunks: int) -> list[float]:
    """Per-chunk scale of the adapter's shift: ``A`` (every chunk after the first), ``ramp:S`` (chunk i: min(1, S*i)),
    ``lin:A,B`` (chunk i: A + B*i), ``all:A`` (the first chunk too), ``layers:A,B,...`` (every chunk after the first,
    one scale per equal group of layers)."""
    kind, _, arg = reading.partition(":")
    if kind == "ramp":
        return [0.0] + [min(1.0, float(arg) * i) for i in range(1, n_chunks)]
    if kind == "lin":
        a, b = (float(x) for x in arg.split(","))
        return [0.0] + [a + b * i for i in range(1, n_chunks)]
    if kind == "all":
        return [float(arg)] * n_chunks
    if kind == "layers":
        return [0.0] + [tuple(float(x) for x in arg.split(","))] * (n_chunks - 1)
    return [0.0] + [float(reading)] * (n_chunks - 1)


class ShiftScaled(ContextMethod):
    def __init__(self, scales: list[float]):
        self.scales, self.name, self.packet_kinds = scales, "shift_scaled", ("exact", "adapted")

    def prepare(self, source, chunks, buffer, reserve):
        exact = source.packets_for(chunks, "exact").packets
        adapted = source.packets_for(chunks, "adapted").packets
        n_header = source.adapter.n_header
        rope = source.model.rope
        blocks = [source.preamble_block()]
        for scale, ex, ad in zip(self.scales, exact, adapted):
            if scale == 0.0:
                blocks.append((ex.keys, ex.values))
                continue
            keys, values = ad.keys.clone(), ad.values.clone()
            span = slice(n_header, n_header + ex.length)
            ex_keys = rotate_keys(ex.keys, n_header, rope)
            layers = keys.shape[0]
            groups = scale if isinstance(scale, tuple) else (scale,)
            per_layer = torch.tensor([groups[min(len(groups) - 1, l * len(groups) // layers)] for l in range(layers)],
                                     dtype=keys.dtype)[:, None, None, None]
            keys[:, :, span] = ex_keys + per_layer * (keys[:, :, span] - ex_keys)
            values[:, :, span] = ex.values + per_layer * (values[:, :, span] - ex.values)
            blocks.append((keys, values))
        cache = assemble(buffer, blocks, rope, reserve)
        return PreparedContext(cache, sum(b[0].shape[2] for b in blocks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["biography:5"])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--readings", nargs="+", default=["1", "0.9", "1.1"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/eval_cache"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    tune_malloc()
    engine = PacketEngine(store=InMemoryStore())
    result = {"machine": machine_info(args.threads), "sets": {}}
    for spec in args.sets:
        name, _, docs = spec.partition(":")
        options = {"docs_per_sample": int(docs)} if docs else {}
        samples = load_samples(name, "test", args.n, seed=1, **options)
        cache_name = f"{engine.model.fingerprint[:12]}-{spec.replace(':', '_')}-seed1-cap32.json"
        answers = json.loads((args.cache_dir / cache_name).read_text())
        sums = {r: 0.0 for r in args.readings}
        per_q = {r: [] for r in args.readings}
        tokens = 0
        start = time.time()
        for sample in samples:
            ids = answers[sample.id]["full_ids"]
            full = continuation_logprobs(engine, "full_recompute", sample.question, sample.chunks, ids)
            for reading in args.readings:
                method = ShiftScaled(alphas(reading, len(sample.chunks)))
                other = continuation_logprobs(engine, method, sample.question, sample.chunks, ids)
                kl = float(kl_per_token(full[:-1], other[:-1]).sum())
                sums[reading] += kl
                per_q[reading].append(kl)
            tokens += len(ids)
        rows = {r: sums[r] / tokens for r in args.readings}
        base = args.readings[0]
        lower = {r: sum(a < b for a, b in zip(per_q[r], per_q[base])) for r in args.readings}
        result["sets"][spec] = {"kl_per_token": rows, "lower_than_first": lower, "n": len(samples),
                                "per_question": per_q, "seconds": time.time() - start}
        print(spec, " ".join(f"{r}={v:.4f}({lower[r]})" for r, v in rows.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
