"""Tests of the answer metrics on hand-computed examples."""

from __future__ import annotations

import pytest

from kvpacket_rag.metrics import (
    aggregate,
    answer_recall,
    best_f1,
    exact_match,
    macro_f1,
    micro_f1,
    normalize_answer,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Beatles!", "beatles"),
        ("  an   Apple, a Pear  ", "apple pear"),
        ("U.S.A.", "usa"),
        ("theatre", "theatre"),  # articles only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_token_f1_worked_examples() -> None:
    assert token_f1("Paris", "paris.") == 1.0
    assert token_f1("born in Paris France", "Paris") == pytest.approx(0.4)  # P 1/4, R 1
    assert token_f1("New York", "New York City") == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset overlap: a, b
    assert token_f1("Lyon", "Paris") == 0.0
    assert token_f1("", "the") == 1.0  # both empty after normalisation
    assert token_f1("", "Paris") == 0.0


def test_best_f1_and_exact_match_take_the_best_reference() -> None:
    assert best_f1("New York", ["NYC", "New York City"]) == pytest.approx(0.8)
    assert exact_match("the Beatles.", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_answer_recall_matches_whole_tokens() -> None:
    assert answer_recall("She was born on March 4, 1987 in Lisbon.", ["march 4 1987"]) == 1.0
    assert answer_recall("It cost 1987 dollars", ["198"]) == 0.0
    assert answer_recall("Lisbon", ["Porto", "Lisbon"]) == 1.0


def test_micro_vs_macro() -> None:
    predictions = ["Paris", "in the city of New York"]
    references = [["Paris"], ["New York City"]]
    # Per sample: 1.0 and 2*3/(5+3) = 0.75; summed counts: common 4, pred 6, gold 4.
    assert macro_f1(predictions, references) == pytest.approx(0.875)
    assert micro_f1(predictions, references) == pytest.approx(2 * (4 / 6) * 1.0 / (4 / 6 + 1.0))
    assert micro_f1(["x"], [["y"]]) == 0.0


def test_micro_f1_weighs_long_answers_more() -> None:
    predictions = ["p q r s t u v w", "wrong"]
    references = [["p q r s t u v w"], ["right"]]
    assert macro_f1(predictions, references) == pytest.approx(0.5)
    assert micro_f1(predictions, references) == pytest.approx(8 / 9)


def test_aggregate() -> None:
    scores = aggregate([("Paris", ["Paris"]), ("born in Lyon", ["Lyon"])])
    assert scores["n"] == 2
    assert scores["exact_match"] == 0.5
    assert scores["answer_recall"] == 1.0
    assert scores["macro_f1"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["micro_f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # common 2, pred 4, gold 2


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        best_f1("x", [])
    with pytest.raises(TypeError, match="not a single string"):
        exact_match("x", "x")
    with pytest.raises(ValueError, match="2 predictions but 1"):
        micro_f1(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="zero samples"):
        aggregate([])
