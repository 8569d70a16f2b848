"""Probe for a copy-free question path: attention over the packets where they lie, merged by log-sum-exp.

Per layer, the question's packed queries (3 KV heads x 57 rows, as at 8 x 512 with a 19-token question) attend
either to one contiguous buffer of 8 x 512 keys/values (today's path, after the assembly copies the packets into
it) or to the 8 packets one by one, the partial results merged by their log-sum-exp (exact: printed). Also timed:
the copy that the assembly makes (without the key rotation). 30 layers of distinct tensors, so caches are cold as in a
forward; 2 threads, medians of 9.

    python benchmarks/adapter/experiments/segmented_attention.py
"""
import statistics
import time

import torch

torch.set_num_threads(2)
op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
L, S, T = 30, 8, 512
q = torch.randn(1, 3, 57, 64)
segK = [[torch.randn(1, 3, T, 64) for _ in range(S)] for _ in range(L)]
segV = [[torch.randn(1, 3, T, 64) for _ in range(S)] for _ in range(L)]
bufK = [torch.cat(k, 2) for k in segK]; bufV = [torch.cat(v, 2) for v in segV]
def t(f, n=9):
    for _ in range(2): f()
    ts = []
    for _ in range(n):
        a = time.perf_counter(); f(); ts.append(time.perf_counter() - a)
    return statistics.median(ts) * 1e3
def one():
    for l in range(L):
        torch.nn.functional.scaled_dot_product_attention(q, bufK[l], bufV[l])
def segs():
    for l in range(L):
        outs, lses = [], []
        for k, v in zip(segK[l], segV[l]):
            o, lse = op(q, k, v)[:2]
            outs.append(o); lses.append(lse)
        lse = torch.stack(lses)            # [S, 1, 3, 57]
        w = torch.softmax(lse, 0)          # weights per segment
        out = sum(w[i].unsqueeze(-1) * outs[i] for i in range(S))
def assemble():
    for l in range(L):
        torch.cat(segK[l], 2, out=bufK[l]); torch.cat(segV[l], 2, out=bufV[l])
o, lse = op(q, bufK[0], bufV[0])[:2]
print("lse shape", lse.shape, o.shape)
# exactness of merge
outs, lses = [], []
for k, v in zip(segK[0], segV[0]):
    a, b = op(q, k, v)[:2]; outs.append(a); lses.append(b)
w = torch.softmax(torch.stack(lses), 0)
m = sum(w[i].unsqueeze(-1) * outs[i] for i in range(S))
print("merge max diff", (m - o).abs().max().item())
print("one buffer %.1f ms, 8 segments %.1f ms, assembly copy %.1f ms" % (t(one), t(segs), t(assemble)))
