"""Probe: is a chunk's remaining key/value error one offset shared by its tokens?

For 6 biography training samples (5 documents each; contexts drawn from 6 other training samples' documents), each
chunk after the first is read from its packet averaged over 4 random contexts of as many passages as precede it (by
place), and compared with full recompute's keys/values of the same tokens (keys taken back to before RoPE, so that an
offset shared in the model's own space shows as one). Printed, per layer and over all layers, the share of the error
energy of every chunk's tokens after its first K that is left:
- by the best offset shared by those tokens (per layer and KV head: an oracle that knows the error);
- by the first K tokens' mean error, scaled per layer and head by the best factor (what a question-time
  correction could learn from K refreshed tokens, optimistic: the factor is fitted on the error it removes);
- by the first K tokens' mean error as it is.

    python benchmarks/adapter/experiments/deviation_structure.py > benchmarks/adapter/experiments/deviation_structure.md
"""
import random
import tempfile

import torch

from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.kvcache import KVBuffer, PacketCache
from kvpacket_rag.rope import delta_cos_sin, rotate_half
from kvpacket_rag.datasets.biography import biography_samples
from kvpacket_rag.store import open_store

torch.set_num_threads(1)
engine = PacketEngine(None, adapter="none+preamble", store=open_store(tempfile.mkdtemp()), device="cpu")
fmt, spec = engine.formatter, engine.model.rope
pre = engine.preamble_ids()
K, CONTEXTS = 8, 4
samples = list(biography_samples("train", 12, seed=5))
pool = [c for s in samples[6:] for c in s.chunks]
rng = random.Random(0)

def kv(ids):
    cache = PacketCache(KVBuffer(engine.model, len(ids)), 0)
    engine.forward_context(ids, cache)
    return cache.to_block()  # [L, H, T, D]

def unrotate(keys, start):  # keys at global positions start.. -> pre-RoPE
    T = keys.shape[2]
    out = torch.empty_like(keys)
    for t in range(T):
        cos, sin = delta_cos_sin(spec, -(start + t), "cpu", torch.float32)
        k = keys[:, :, t]
        out[:, :, t] = k * cos + rotate_half(k) * sin
    return out

stats = []
for s in samples[:6]:
    ids = [fmt.chunk_ids(c) for c in s.chunks]
    full_k, full_v = kv(pre + [t for i in ids for t in i])
    start = len(pre)
    for j, chunk in enumerate(ids):
        T = len(chunk)
        if j == 0:
            start += T; continue
        # calibrated packet: mean over contexts of j random passages, chunk keys moved to its real start
        ks, vs = [], []
        for _ in range(CONTEXTS):
            ctx = [t for c in rng.sample(pool, j) for t in fmt.chunk_ids(c)]
            k, v = kv(pre + ctx + chunk)
            b = len(pre) + len(ctx)
            ks.append(unrotate(k[:, :, b:], b)); vs.append(v[:, :, b:])
        cal_k, cal_v = torch.stack(ks).mean(0), torch.stack(vs).mean(0)
        true_k, true_v = unrotate(full_k[:, :, start:start + T], start), full_v[:, :, start:start + T]
        for name, D in (("k", true_k - cal_k), ("v", true_v - cal_v)):
            rest, first = D[:, :, K:], D[:, :, :K]
            total = rest.square().sum(dim=(2, 3))  # [L, H]
            shared = rest.mean(2, keepdim=True)
            oracle = (rest - shared).square().sum(dim=(2, 3))
            f = first.mean(2, keepdim=True)  # predictor: beta * mean of first K (beta fit per layer/head on this chunk: optimistic)
            beta = (shared * f).sum(-1, keepdim=True) / f.square().sum(-1, keepdim=True).clamp_min(1e-30)
            pred = (rest - beta * f).square().sum(dim=(2, 3))
            pred1 = (rest - f).square().sum(dim=(2, 3))
            stats.append((name, j, total, oracle, pred, pred1))
        start += T
for name in ("k", "v"):
    rows = [r for r in stats if r[0] == name]
    tot = sum(r[2] for r in rows); ora = sum(r[3] for r in rows); pr = sum(r[4] for r in rows); p1 = sum(r[5] for r in rows)
    L = tot.shape[0]
    print("\n" + name, "all layers: shared-offset oracle leaves %.3f, beta*first-K leaves %.3f, first-K mean as is leaves %.3f" % (
        (ora.sum() / tot.sum()).item(), (pr.sum() / tot.sum()).item(), (p1.sum() / tot.sum()).item()))
    for l in range(0, L, 3):
        print("  layer %2d: energy %.3g  oracle %.3f  beta %.3f  as-is %.3f" % (l, tot[l].sum(), (ora[l].sum() / tot[l].sum()).item(),
              (pr[l].sum() / tot[l].sum()).item(), (p1[l].sum() / tot[l].sum()).item()))
