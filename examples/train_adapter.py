"""Train a KV-packet adapter (soft header/trailer tokens) for a model, then answer with it.

Run: ``python examples/train_adapter.py`` (the notebook train_adapter.ipynb holds the same cells).
The settings are tiny so that it finishes in minutes on a laptop CPU; ``KVPACKET_EXAMPLE_FAST=1`` makes them
tinier still (the tests). The recipe of the shipped adapter is ``python training/recipes/smollm2_default.py``.
"""

# %% [markdown]
# # Training an adapter for a model
#
# Packets computed one chunk at a time never saw the other chunks, so gluing them together confuses the
# model. A small *adapter* fixes that: a few trained soft tokens placed before (header) and after (trailer)
# every chunk. Training is self-distillation: the student (packets + adapter) learns to produce the teacher's
# (full recompute) next-token distribution over the teacher's own answers. No labels are needed and the model
# stays frozen: only the soft tokens are trained.
#
# The settings here are tiny (a handful of synthetic biography samples, one or two epochs) to show the workflow
# in a few minutes on a CPU. Real adapters use hundreds of samples; see `training/recipes/`.

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from kvpacket_rag import GenerationConfig, PacketEngine, load_model
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.metrics import best_f1
from kvpacket_rag.training import TrainConfig, train

FAST = os.environ.get("KVPACKET_EXAMPLE_FAST") == "1"  # tinier run (tests)
THREADS = int(os.environ.get("KVPACKET_EXAMPLE_THREADS", "0")) or None
if THREADS:
    torch.set_num_threads(THREADS)
workdir = Path(tempfile.mkdtemp(prefix="kvpacket-adapter-"))

# %% [markdown]
# ## Settings
#
# `model=None` is the embedded SmolLM2-135M-Instruct; pass any Hugging Face Llama, Qwen2/3 or Mistral id or
# directory to train an adapter for another model. The same run from the command line:
#
# ```
# kvpacket train --data biography --samples 16 --epochs 2 --batch-size 4 --n-header 4 --n-trailer 4 \
#     --max-chunks 3 --answer-cap 16 --out my-adapter.safetensors
# ```

# %%
config = TrainConfig(
    out=workdir / "my-adapter.safetensors",
    model=None,                                # the embedded default model
    data="biography",                          # synthetic biographies (train split): no download
    data_options={"biography": {"docs_per_sample": [2, 3]}},
    max_chunks=3,
    samples=4 if FAST else 16,
    epochs=1 if FAST else 2,
    batch_size=2 if FAST else 4,
    lr=1e-2,
    n_header=4,
    n_trailer=4,
    answer_cap=8 if FAST else 16,              # tokens of the teacher's answer distilled per sample
    teacher_top_k=64,                          # keep the teacher's top-64 log-probabilities
    threads=THREADS,
    checkpoint_every=0,
    teacher_cache=workdir / "teacher",
    progress=not FAST,
)
print(f"{config.samples} samples x {config.epochs} epochs = {config.total_steps} optimizer steps -> {config.out}")

# %% [markdown]
# ## Train
#
# The teacher (full recompute) answers every sample once (cached on disk), then the adapter is optimised.
# The model is loaded once and shared with the evaluation below.

# %%
model = load_model()
result = train(config, model)
print(f"{result.steps} steps in {result.wall_time_s:.0f} s, final loss (KL per token) {result.final_loss:.4f}")
print("adapter written to", result.path)

# %%
steps = [entry["step"] for entry in result.log]
plt.figure(figsize=(5, 3))
plt.plot(steps, [entry["loss"] for entry in result.log], marker="o")
plt.xlabel("optimizer step")
plt.ylabel("KL to full recompute (per token)")
plt.title("adapter training")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Use the adapter
#
# Pass the file to `PacketEngine` (or `kvpacket ask --adapter FILE`, `ChatKVPacket(adapter=FILE)`,
# `KVPacketLLM(PacketEngine(adapter=FILE))`). Packets record the adapter's fingerprint, so packets built with
# another adapter are never reused by mistake.
#
# Below: biography questions from the *test* split (people never seen in training), answered by full
# recompute, by bare packets (no adapter) and by packets with the adapter. With these tiny settings the
# adapter has barely trained; the shipped adapter is trained with the recipe in `training/recipes/`.

# %%
samples = load_samples("biography", "test", 2 if FAST else 6, seed=0, docs_per_sample=3)
engines = {"full_recompute": PacketEngine(model, adapter=None), "bare packets": PacketEngine(model, adapter=None),
           "packets + adapter": PacketEngine(model, adapter=result.path)}
methods = {"full_recompute": "full_recompute", "bare packets": "kv_packet", "packets + adapter": "kv_packet"}
scores = {name: [] for name in engines}
generation = GenerationConfig(max_new_tokens=24)
for sample in samples:
    print("Q:", sample.question, "| gold:", sample.answers[0])
    for name, engine in engines.items():
        answer = engine.answer(sample.question, sample.chunks, method=methods[name], generation=generation)
        scores[name].append(best_f1(answer.text, sample.answers))
        print(f"   {name:18s} {answer.text!r}")
for name, values in scores.items():
    print(f"{name:18s} mean F1 {sum(values) / len(values):.2f}")

# %% [end]
