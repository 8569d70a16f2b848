"""Token-aware chunking: sizes in model tokens, cuts between sentences, overlap, huge and empty documents."""

from __future__ import annotations

import pytest

from kvpacket_rag.chunker import Chunker, ChunkerConfig
from kvpacket_rag.errors import EmptyInputError

SENTENCES = [f"Sentence {i} says that item {i} costs {i * 3} coins." for i in range(40)]
TEXT = " ".join(SENTENCES[:20]) + "\n\n" + " ".join(SENTENCES[20:])


def _check_chunks(chunker, text, chunks):
    limit = chunker.config.chunk_tokens
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end] == chunk.text.strip()
        assert chunk.n_tokens == chunker.count_tokens(chunk.text) <= limit
        assert chunk.n_tokens == len(chunker.tokenizer(chunk.text, add_special_tokens=False)["input_ids"])
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)


def test_chunks_fit_and_end_at_sentences(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=48)
    chunks = chunker.split(TEXT)
    _check_chunks(chunker, TEXT, chunks)
    assert len(chunks) > 5
    assert all(chunk.text.endswith("coins.") and chunk.text.startswith("Sentence") for chunk in chunks)
    # without overlap the chunks tile the text: every sentence appears exactly once
    assert sum(chunk.text.count("Sentence") for chunk in chunks) == len(SENTENCES)


def test_overlap_repeats_whole_trailing_sentences(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=48, overlap_tokens=20)
    chunks = chunker.split(TEXT)
    _check_chunks(chunker, TEXT, chunks)
    for previous, following in zip(chunks, chunks[1:]):
        last_sentence = previous.text[previous.text.rfind("Sentence"):]
        assert following.text.startswith(last_sentence)
        assert following.start < previous.end


def test_long_sentences_are_cut_between_words(tokenizer):
    text = "Preface. " + " ".join(f"word{i}" for i in range(400)) + " and then it ends."
    chunker = Chunker(tokenizer, chunk_tokens=32)
    chunks = chunker.split(text)
    _check_chunks(chunker, text, chunks)
    words = [w for chunk in chunks for w in chunk.text.split()]
    assert words == text.split()  # no word is cut in half
    unbroken = "x" * 3000  # no spaces at all: cut between tokens
    pieces = chunker.split(unbroken)
    _check_chunks(chunker, unbroken, pieces)
    assert "".join(p.text for p in pieces) == unbroken


def test_huge_document_and_single_sentence(tokenizer):
    chunker = Chunker(tokenizer, chunk_tokens=200)
    text = "The quick brown fox jumps over the lazy dog. " * 20000  # ~900 kB
    chunks = chunker.split(text)
    assert 500 < len(chunks) < 2000
    assert max(c.n_tokens for c in chunks) <= 200
    single = chunker.split("  Just one short line.  ")
    assert [(c.text, c.start) for c in single] == [("Just one short line.", 2)]


def test_bad_input_and_config(tokenizer):
    chunker = Chunker(tokenizer)
    for empty in ("", "   \n\n  "):
        with pytest.raises(EmptyInputError, match="empty"):
            chunker.split(empty)
    with pytest.raises(TypeError):
        chunker.split(None)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ChunkerConfig(chunk_tokens=4)
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkerConfig(chunk_tokens=64, overlap_tokens=64)
