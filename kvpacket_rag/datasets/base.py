"""Common types for evaluation and training data.

Every loader in :mod:`kvpacket_rag.datasets` yields :class:`Sample` objects: a
question over a fixed, ordered list of text chunks (one KV packet each), with
the gold answers used for scoring.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["DatasetError", "Sample", "stable_hash", "validate_split", "validate_count"]

SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A data file or loader parameter is unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    """One RAG question with its retrieved context.

    Attributes:
        id: Identifier, unique within a loader's output (e.g. ``"hotpotqa/5a8b57f2..."``).
        chunks: The context chunks, in prompt order; each becomes one packet.
            At least one, none empty after ``strip()``.
        question: The question, not empty after ``strip()``.
        answers: Accepted gold answers; empty for training-only data.

    Raises:
        ValueError: if ``chunks`` is empty, a chunk is blank or ``question`` is blank.
    """

    id: str
    chunks: tuple[str, ...]
    question: str
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", tuple(self.chunks))
        object.__setattr__(self, "answers", tuple(self.answers))
        if not self.chunks:
            raise ValueError(f"sample {self.id!r}: chunks must contain at least one chunk")
        for i, chunk in enumerate(self.chunks):
            if not isinstance(chunk, str) or not chunk.strip():
                raise ValueError(f"sample {self.id!r}: chunk {i} is empty; every chunk needs text")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"sample {self.id!r}: question is empty")


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash of ``text`` (unlike the salted built-in ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def validate_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``, else raise :class:`DatasetError`."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def validate_count(n: int) -> int:
    """Return ``n`` if it is a non-negative int, else raise :class:`DatasetError`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"number of samples must be a non-negative integer, got {n!r}")
    return n
