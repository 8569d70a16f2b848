"""SQuAD-style answer scoring: normalisation, token F1, exact match, recall, aggregates.

Per-sample scores compare one prediction with a list of accepted references and
keep the best. Two corpus F1s are provided:

- **micro** (as in the KV Packet paper): token counts are summed over samples
  before precision and recall are computed, so long answers weigh more;
- **macro**: the mean of per-sample F1, as in the official SQuAD script.

To measure fidelity to full recompute, score the packet answer against the
full-recompute answer as the single reference.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "aggregate",
    "answer_recall",
    "best_f1",
    "exact_match",
    "macro_f1",
    "micro_f1",
    "normalize_answer",
    "token_f1",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace.

    Example:
        >>> normalize_answer("The  Eiffel-Tower, in Paris!")
        'eiffeltower in paris'
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass(frozen=True)
class _Overlap:
    """Token counts of one prediction/reference pair: shared, predicted, gold."""

    common: int
    pred: int
    gold: int

    @property
    def f1(self) -> float:
        if self.pred == 0 or self.gold == 0:  # SQuAD v2 rule: empty matches only empty
            return float(self.pred == self.gold)
        return 2 * self.common / (self.pred + self.gold)


def _overlap(prediction: str, reference: str) -> _Overlap:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    return _Overlap(common, len(pred), len(gold))


def _best_overlap(prediction: str, references: Sequence[str]) -> _Overlap:
    return max((_overlap(prediction, r) for r in _check(references)), key=lambda o: o.f1)


def _check(references: Sequence[str]) -> Sequence[str]:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if not references:
        raise ValueError("at least one reference answer is needed to score a prediction")
    return references


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after :func:`normalize_answer`.

    Two empty answers score 1.0; one empty answer scores 0.0.

    Example:
        >>> token_f1("born in Paris France", "Paris")  # P = 1/4, R = 1/1
        0.4
    """
    return _overlap(prediction, reference).f1


def best_f1(prediction: str, references: Sequence[str]) -> float:
    """Highest :func:`token_f1` of ``prediction`` over ``references`` (non-empty).

    Example:
        >>> best_f1("Paris", ["Paris, France", "Paris"])
        1.0
    """
    return _best_overlap(prediction, references).f1


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised reference, else 0.0.

    Example:
        >>> exact_match("the Beatles.", ["Beatles"]), exact_match("The Beatles band", ["Beatles"])
        (1.0, 0.0)
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in _check(references)))


def answer_recall(prediction: str, references: Sequence[str]) -> float:
    """1.0 if some normalised reference occurs in the normalised prediction as whole tokens.

    Useful for verbose models whose correct answers drown in extra words.

    Example:
        >>> answer_recall("He was born in 1987 in Lisbon.", ["lisbon"])
        1.0
        >>> answer_recall("It cost 1987 dollars", ["198"])  # no partial-token matches
        0.0
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(r)} " in pred for r in _check(references)))


def micro_f1(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Corpus F1 from token counts summed over samples (the KV Packet paper's metric).

    For each sample the reference with the best :func:`token_f1` is kept; then
    ``P = sum(common) / sum(pred)``, ``R = sum(common) / sum(gold)`` and
    ``F1 = 2PR / (P + R)`` (0.0 when nothing overlaps).

    Example:
        >>> preds, refs = ["Paris", "in the city of New York"], [["Paris"], ["New York City"]]
        >>> round(micro_f1(preds, refs), 4)  # common 1+3, pred 1+5, gold 1+3
        0.8
        >>> round(macro_f1(preds, refs), 4)  # (1.0 + 2*3/(5+3)) / 2
        0.875
    """
    overlaps = [_best_overlap(p, r) for p, r in _zip(predictions, references_list)]
    common = sum(o.common for o in overlaps)
    if common == 0:
        return 0.0
    precision = common / sum(o.pred for o in overlaps)
    recall = common / sum(o.gold for o in overlaps)
    return 2 * precision * recall / (precision + recall)


def macro_f1(predictions: Sequence[str], references_list: Sequence[Sequence[str]]) -> float:
    """Mean over samples of :func:`best_f1` (the official SQuAD aggregate)."""
    pairs = _zip(predictions, references_list)
    return sum(best_f1(p, r) for p, r in pairs) / len(pairs)


def aggregate(records: Iterable[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """All corpus scores for ``(prediction, references)`` records.

    Returns:
        ``{"n", "micro_f1", "macro_f1", "exact_match", "answer_recall"}``; the
        last two are means over samples.

    Example:
        >>> aggregate([("Paris", ["Paris"]), ("Lyon", ["Nice"])])
        {'n': 2, 'micro_f1': 0.5, 'macro_f1': 0.5, 'exact_match': 0.5, 'answer_recall': 0.5}
    """
    records = list(records)
    predictions, references_list = [p for p, _ in records], [r for _, r in records]
    n = len(_zip(predictions, references_list))
    return {
        "n": n,
        "micro_f1": micro_f1(predictions, references_list),
        "macro_f1": macro_f1(predictions, references_list),
        "exact_match": sum(exact_match(p, r) for p, r in records) / n,
        "answer_recall": sum(answer_recall(p, r) for p, r in records) / n,
    }


def _zip(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> list[tuple[str, Sequence[str]]]:
    if len(predictions) != len(references_list):
        n_pred, n_refs = len(predictions), len(references_list)
        raise ValueError(f"{n_pred} predictions but {n_refs} reference lists")
    if not predictions:
        raise ValueError("cannot aggregate scores over zero samples")
    return list(zip(predictions, references_list))
