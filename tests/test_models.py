"""Loading models the Hugging Face way: auto device and dtype, keyword pass-through, the user's progress bar setting."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from kvpacket_rag.models import load_model, resolve_device, resolve_dtype
from kvpacket_rag.testing import make_tiny_model


def test_auto_device_and_dtype():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize("bars", [True, False])
def test_loading_keeps_the_users_progress_bar_setting_and_passes_model_kwargs(tokenizer, tmp_path, bars):
    tiny = make_tiny_model("llama", tokenizer, seed=2)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    try:
        device = "auto" if resolve_device("auto").type == "cpu" else "cpu"
        loaded = load_model(str(tmp_path), device=device, dtype="auto", revision=None,
                            model_kwargs={"low_cpu_mem_usage": True})
        assert hf_logging.is_progress_bar_enabled() is bars
    finally:
        hf_logging.enable_progress_bar()
    assert loaded.dtype == torch.float32 and loaded.config.hidden_size == tiny.config.hidden_size


def test_the_same_weights_from_another_directory_keep_their_fingerprint(tokenizer, tmp_path):
    """Packets and adapters are keyed by config and weights, never by where the model was loaded from."""
    tiny = make_tiny_model("llama", tokenizer, seed=4)
    for folder in ("a", "b"):
        tiny.model.save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    first, second = load_model(str(tmp_path / "a")), load_model(str(tmp_path / "b"))
    assert first.name != second.name and first.fingerprint == second.fingerprint == tiny.fingerprint
    other = make_tiny_model("llama", tokenizer, seed=5)
    assert other.fingerprint != tiny.fingerprint
