"""Training samples: a weighted mixture of datasets, tokenized exactly as the engine tokenizes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpacket_rag.datasets import DatasetError, Sample, load_samples, parse_mixture
from kvpacket_rag.errors import ContextTooLongError, EmptyInputError, KVPacketError
from kvpacket_rag.models import LoadedModel
from kvpacket_rag.prompt import PromptFormatter


class TrainingDataError(KVPacketError, ValueError):
    """Training data is unusable (missing, empty or malformed file, bad spec); the message says how to fix it."""


@dataclass(frozen=True)
class TokenizedSample:
    """One training sample as token ids, tokenized piece by piece like the engine.

    Attributes:
        id: the dataset sample id.
        chunk_ids: token ids of each chunk (``PromptFormatter.chunk_ids``), in prompt order.
        suffix_ids: the question and assistant header (``PromptFormatter.suffix_ids``).
    """

    id: str
    chunk_ids: tuple[tuple[int, ...], ...]
    suffix_ids: tuple[int, ...]

    def prompt_ids(self, preamble_ids: list[int]) -> list[int]:
        """What full recompute runs through the model: ``preamble | chunks | suffix``."""
        ids = list(preamble_ids)
        for chunk in self.chunk_ids:
            ids += chunk
        return ids + list(self.suffix_ids)


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """``"biography:0.5,hotpotqa:0.5"`` -> ``[("biography", 0.5), ("hotpotqa", 0.5)]`` (weight defaults to 1).

    Raises:
        TrainingDataError: an empty part, a repeated name or a weight that is not a positive number.
    """
    try:
        return parse_mixture(spec)
    except DatasetError as error:
        raise TrainingDataError(str(error)) from error


def apportion(weights: list[float], n: int) -> list[int]:
    """Largest-remainder rounding of ``n * w / sum(weights)`` (counts sum to ``n``)."""
    quotas = [n * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    for k in sorted(range(len(weights)), key=lambda k: (counts[k] - quotas[k], k))[: n - sum(counts)]:
        counts[k] += 1
    return counts


def load_training_samples(spec: str, split: str, n: int, seed: int = 0,
                          options: dict[str, dict[str, Any]] | None = None,
                          max_chunks: int | None = None) -> list[Sample]:
    """``n`` samples of a weighted mixture, components interleaved evenly.

    Args:
        spec: ``NAME[:WEIGHT],...`` (see `parse_data_spec`); names as in `kvpacket_rag.datasets.load_samples`.
        split: ``train`` or ``test``.
        options: loader options per name (e.g. ``{"biography": {"docs_per_sample": [2, 3]}}``).
        max_chunks: keep only the first this-many chunks of each sample.

    Raises:
        TrainingDataError: the spec is malformed, a dataset is unknown or missing, a file is empty or has a
            malformed line (the message gives the line number), or a source has too few samples.
    """
    parts = parse_data_spec(spec)
    options = options or {}
    keyed = []
    for k, ((name, _), count) in enumerate(zip(parts, apportion([w for _, w in parts], n))):
        if not count:
            continue
        try:
            samples = load_samples(name, split, count, seed, **options.get(name, {}))
        except DatasetError as error:
            raise TrainingDataError(f"training data {name!r}: {error}") from error
        keyed += [((j + 0.5) / count, k, _truncate(s, max_chunks)) for j, s in enumerate(samples)]
    return [sample for *_, sample in sorted(keyed, key=lambda t: t[:2])]


def _truncate(sample: Sample, max_chunks: int | None) -> Sample:
    if max_chunks is None or len(sample.chunks) <= max_chunks:
        return sample
    return Sample(sample.id, sample.chunks[:max_chunks], sample.question, sample.answers)


def tokenize_sample(sample: Sample, formatter: PromptFormatter, model: LoadedModel, n_adapter_tokens: int,
                    answer_cap: int) -> TokenizedSample:
    """Token ids of ``sample``, checked against the model's context.

    Raises:
        ContextTooLongError: a wrapped chunk, or the whole prompt plus ``answer_cap`` answer tokens, exceeds
            the model's positions (the message names the sample and chunk).
        TrainingDataError: a chunk or the question is empty.
    """
    try:
        chunks = tuple(tuple(formatter.chunk_ids(chunk)) for chunk in sample.chunks)
        suffix = tuple(formatter.suffix_ids(sample.question))
    except EmptyInputError as error:
        raise TrainingDataError(f"sample {sample.id}: {error}") from error
    limit = model.max_positions
    for index, ids in enumerate(chunks):
        if len(ids) + n_adapter_tokens > limit:
            raise ContextTooLongError(
                f"sample {sample.id}: chunk {index} has {len(ids)} tokens (+{n_adapter_tokens} adapter tokens), "
                f"over the {limit} positions of {model.name}; split long documents into smaller chunks.")
    total = (len(formatter.preamble_ids()) + sum(len(c) + n_adapter_tokens for c in chunks) + len(suffix)
             + answer_cap)
    if total > limit:
        raise ContextTooLongError(
            f"sample {sample.id}: preamble, {len(chunks)} wrapped chunks, question and a {answer_cap}-token answer "
            f"need {total} positions, over the {limit} of {model.name}; use fewer chunks (max_chunks) or shorter ones.")
    return TokenizedSample(sample.id, chunks, suffix)
