"""Tiny random-initialised models of each supported family, for tests and quick experiments.

Example:
    >>> model = make_tiny_model("qwen3", tokenizer)   # 2 layers, GQA, fp32, random weights
"""

from __future__ import annotations

import asyncio
import threading

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from .adapter import PREFIX_PREAMBLE, PacketAdapter
from .builder import PacketBuilder
from .kvcache import KVBuffer, PacketCache, assemble
from .lora import BuildLoRA
from .models import LoadedModel, wrap_model
from .packet import KVPacket
from .prompt import PromptFormatter
from .reference import block_forward
from .store import InMemoryStore

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer config of ``arch`` with GQA (4 query heads, 2 KV heads, head dim 16); ``overrides`` win."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  tie_word_embeddings=True)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return _CONFIGS[arch](**kwargs)


def make_tiny_model(arch: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LoadedModel:
    """A random ``arch`` model sized for ``tokenizer``, validated like any loaded model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **overrides), attn_implementation="sdpa")
    return wrap_model(model.to(dtype), tokenizer, f"tiny-{arch}")


def make_lora_adapter(model: LoadedModel, seed: int = 0, n_soft: int = 2, prefix: str = "preamble") -> PacketAdapter:
    """A random ``n_soft`` + ``n_soft`` adapter with a rank-2 build-time LoRA of the key and value projections
    whose updates are non-zero (``B`` drawn from N(0, 0.1²)), packets built after ``prefix``."""
    lora = BuildLoRA.initialize(model, rank=2, targets=("k_proj", "v_proj"), seed=seed)
    for up in lora.up.values():
        torch.nn.init.normal_(up, std=0.1)
    return PacketAdapter.initialize(model, n_soft, n_soft, seed=seed, prefix=prefix).with_lora(lora)


@torch.no_grad()
def packet_path_logits(model: LoadedModel, adapter: PacketAdapter, formatter: PromptFormatter, chunks, question: str,
                       tmp_path=None, exact_first: bool = False) -> torch.Tensor:
    """Question logits ``[len(suffix), vocab]`` through the packet path: build each packet alone, save/load it
    (through ``tmp_path`` files, else an in-memory store), rotate, assemble after the preamble, prefill.
    ``exact_first``: the first chunk's packet is built plain after the preamble (no adapter)."""
    builder = PacketBuilder(model, adapter, formatter)
    exact = PacketBuilder(model, PacketAdapter.empty(model, PREFIX_PREAMBLE), formatter)
    packets = [(exact if exact_first and i == 0 else builder).build(chunk) for i, chunk in enumerate(chunks)]
    if tmp_path is not None:
        packets = [KVPacket.load(p.save(tmp_path / f"{i}.kvp")) for i, p in enumerate(packets)]
    else:
        store = InMemoryStore()
        packets = [store.get(store.put(p)) for p in packets]
    preamble_ids = formatter.preamble_ids()
    preamble_cache = PacketCache(KVBuffer(model), 0)
    ids = torch.tensor([preamble_ids])
    model.model.model(input_ids=ids, position_ids=torch.arange(len(preamble_ids))[None], cache=preamble_cache, use_cache=True)
    preamble = preamble_cache.to_block()
    cache = assemble(KVBuffer(model), [preamble] + [(p.keys, p.values) for p in packets], model.rope, reserve=32)
    suffix = formatter.suffix_ids(question)
    start = cache.get_seq_length()
    out = model.model(input_ids=torch.tensor([suffix]), position_ids=torch.arange(start, start + len(suffix))[None],
                      cache=cache, use_cache=True, logits_to_keep=len(suffix))
    return out.logits[0]


def reference_logits(model: LoadedModel, adapter: PacketAdapter, formatter: PromptFormatter, chunks,
                     question: str, exact_first: bool = False) -> torch.Tensor:
    """The same logits from one forward of the same embeddings under the block-diagonal mask."""
    with torch.no_grad():
        return block_forward(model, adapter, formatter.preamble_ids(), [formatter.chunk_ids(c) for c in chunks],
                             formatter.suffix_ids(question), exact_first=exact_first)


def stream_threads() -> list[threading.Thread]:
    """Async-stream worker threads alive now (none should outlive a closed stream)."""
    from .aio import STREAM_THREAD

    return [t for t in threading.enumerate() if t.name == STREAM_THREAD]


async def ticking(work):
    """Await ``work`` while another coroutine ticks; return (work's result, ticks seen while it ran)."""
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    try:
        result = await work
    finally:
        done = True
        await task
    return result, ticks - start
