"""Shared fixtures: tiny random-initialised models of each supported family, and the real default model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from kvpacket_rag.models import LoadedModel, default_model_dir, load_model
from kvpacket_rag.testing import ARCHS, make_tiny_model
from kvpacket_rag.tuning import tune_malloc

tune_malloc()
torch.set_num_threads(int(os.environ.get("KVPACKET_TEST_THREADS", "2")))

@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (chat template included), from the converted cache."""
    return AutoTokenizer.from_pretrained(default_model_dir())


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
