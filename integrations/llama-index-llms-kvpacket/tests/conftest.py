"""Fixtures: the real default model with the shipped adapter (or a seeded one) and the offline MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kvpacket_rag import PacketAdapter, PacketEngine, load_model  # noqa: E402
from kvpacket_rag.embedder import Embedder  # noqa: E402
from kvpacket_rag.adapter import SHIPPED_ADAPTERS  # noqa: E402
from kvpacket_rag.store import InMemoryStore  # noqa: E402
from kvpacket_rag.tuning import tune_malloc  # noqa: E402

tune_malloc()
torch.set_num_threads(int(os.environ.get("KVPACKET_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def loaded_model():
    return load_model()


def adapter_for(model):
    shipped = SHIPPED_ADAPTERS.get(model.name)
    return "default" if shipped is not None and shipped.is_file() else PacketAdapter.initialize(model, seed=0)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture
def engine(loaded_model) -> PacketEngine:
    """A fresh engine (fresh store and counters) per test; the model is shared."""
    return PacketEngine(loaded_model, adapter=adapter_for(loaded_model), store=InMemoryStore())


@pytest.fixture
def tiny_engine() -> PacketEngine:
    """An engine on a tiny random Llama (untied head: varied tokens; seeded adapter): fast, for concurrency tests."""
    from transformers import AutoTokenizer

    from kvpacket_rag.models import default_model_dir
    from kvpacket_rag.testing import make_tiny_model

    model = make_tiny_model("llama", AutoTokenizer.from_pretrained(default_model_dir()), tie_word_embeddings=False)
    return PacketEngine(model, adapter=PacketAdapter.initialize(model, 4, 4, seed=3), store=InMemoryStore())
