"""Delta re-rotation per RoPE variant, and clear refusals for what cannot be re-rotated."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.errors import UnsupportedModelError
from kvpacket_rag.models import wrap_model
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.rope import rotate_keys

from kvpacket_rag.testing import make_tiny_model, packet_path_logits, reference_logits

CHUNKS = ["Ada Lovelace was born in London in 1815.", "The Analytical Engine was designed by Charles Babbage."]
QUESTION = "Who designed the Analytical Engine?"

THETA = 10000.0
VARIANTS = {
    "default": {"rope_type": "default", "rope_theta": THETA},
    "linear": {"rope_type": "linear", "rope_theta": THETA, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": 512},
}


def keys_at(model, positions: torch.Tensor) -> torch.Tensor:
    """Layer-0 keys of fixed tokens computed at ``positions``."""
    ids = torch.arange(100, 100 + positions.numel())[None]
    with torch.no_grad():
        cache = model.model.model(input_ids=ids, position_ids=positions[None], use_cache=True).cache
    return cache.layers[0].keys


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotation_equals_recomputation_at_new_position(tokenizer, variant):
    model = make_tiny_model("llama", tokenizer, rope_parameters=VARIANTS[variant])
    assert model.rope.rope_type == variant
    local = keys_at(model, torch.arange(0, 12))
    moved = keys_at(model, torch.arange(700, 712))
    # values are position independent, so the same tokens' keys differ only by the rotation
    torch.testing.assert_close(rotate_keys(local, 700, model.rope), moved, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["linear", "llama3", "yarn"])
def test_packet_path_exact_for_scaled_rope(tokenizer, variant):
    model = make_tiny_model("llama", tokenizer, rope_parameters=VARIANTS[variant])
    formatter = PromptFormatter(model.tokenizer)
    adapter = PacketAdapter.initialize(model, 4, 4, seed=2)
    got = packet_path_logits(model, adapter, formatter, CHUNKS, QUESTION)
    want = reference_logits(model, adapter, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("parameters, message", [
    ({"rope_type": "dynamic", "rope_theta": THETA, "factor": 2.0}, "dynamic"),
    ({"rope_type": "longrope", "rope_theta": THETA, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 256}, "longrope"),
])
def test_length_dependent_rope_is_refused(tokenizer, parameters, message):
    with pytest.raises(UnsupportedModelError, match=message):
        make_tiny_model("llama", tokenizer, rope_parameters=parameters)


def test_partial_rotary_is_refused(tokenizer):
    with pytest.raises(UnsupportedModelError, match="partial"):
        make_tiny_model("qwen2", tokenizer, rope_parameters={"rope_type": "default", "rope_theta": THETA,
                                                             "partial_rotary_factor": 0.5})


def test_model_without_rope_is_refused(tokenizer):
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        wrap_model(AutoModelForCausalLM.from_config(config), tokenizer, "tiny-gpt2")


def test_sliding_window_caps_the_context(tokenizer):
    model = make_tiny_model("mistral", tokenizer, sliding_window=64)
    assert model.max_positions == 64
