"""The offline MiniLM embedder: unit vectors, meaningful similarities, a fingerprint that tells embedders apart."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kvpacket_rag.embedder import Embedder, default_embedder_dir  # noqa: E402
from kvpacket_rag.errors import EmptyInputError  # noqa: E402


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def test_vectors_are_float32_unit_rows(embedder):
    vectors = embedder.embed(["Ada was born in London.", "Bob likes green tea.", "x"])
    assert vectors.dtype == np.float32 and vectors.shape == (3, embedder.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors.flags["C_CONTIGUOUS"]
    assert embedder.embed([]).shape == (0, 384)


def test_similarity_follows_meaning(embedder):
    docs = embedder.embed(["Quill Press is a publisher in Edinburgh founded by Fiona Baird.",
                           "Nimbus Air flies turboprop planes between islands."])
    query = embedder.embed_query("Who founded the publishing house?")
    assert query.shape == (384,)
    scores = docs @ query
    assert scores[0] > scores[1]


def test_fingerprint_is_stable_and_tells_weights_apart(embedder):
    again = Embedder(default_embedder_dir())
    assert again.fingerprint != embedder.fingerprint  # another name: "model" directory vs the default label
    same = Embedder(name=embedder.name)
    assert same.fingerprint == embedder.fingerprint
    altered = Embedder(name=embedder.name)
    with torch.no_grad():
        next(altered.model.parameters()).add_(0.01)
    assert Embedder(altered.model, name=embedder.name).fingerprint != embedder.fingerprint


def test_bad_input_is_refused_clearly(embedder, tmp_path):
    with pytest.raises(EmptyInputError, match="empty"):
        embedder.embed(["fine", "  "])
    with pytest.raises(EmptyInputError, match="question is empty"):
        embedder.embed_query("")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        Embedder(tmp_path / "absent")
