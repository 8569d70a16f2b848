"""Shared fixtures: tiny random-initialised models of each supported family, and the real default model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers import AutoModelForCausalLM

from kvpacket_rag.models import LoadedModel, default_model_dir, load_model, wrap_model
from kvpacket_rag.tuning import tune_malloc

tune_malloc()
torch.set_num_threads(int(os.environ.get("KVPACKET_TEST_THREADS", "2")))

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A 2-layer config of ``arch`` with GQA (4 query heads, 2 KV heads, head dim 16)."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                  tie_word_embeddings=True)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return _CONFIGS[arch](**kwargs)


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (chat template included), from the converted cache."""
    return AutoTokenizer.from_pretrained(default_model_dir())


def make_tiny_model(arch: str, tokenizer, seed: int = 0, dtype=torch.float32, **overrides) -> LoadedModel:
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    return wrap_model(model, tokenizer, f"tiny-{arch}")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request, tokenizer) -> LoadedModel:
    """One tiny random model per supported family."""
    return make_tiny_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return make_tiny_model("llama", tokenizer)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """The real embedded SmolLM2-135M-Instruct (fp32, CPU)."""
    return load_model()
