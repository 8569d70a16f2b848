"""PromptFormatter: chunk token ids, remembered for recent chunks."""

import pytest

from kvpacket_rag.errors import EmptyInputError
from kvpacket_rag.prompt import PromptFormatter


def test_chunk_ids_are_the_tokenizers_and_remembered_ids_are_equal(tokenizer):
    formatter = PromptFormatter(tokenizer)
    text = "  Ada Lovelace wrote the first program.  "
    expected = list(tokenizer(text.strip() + "\n\n", add_special_tokens=False)["input_ids"])
    first = formatter.chunk_ids(text)
    assert first == expected
    first.append(-1)  # a caller changing its list does not change what the next caller gets
    assert formatter.chunk_ids(text) == expected


def test_chunk_memo_keeps_the_most_recent_chunks(tokenizer, monkeypatch):
    monkeypatch.setattr(PromptFormatter, "CHUNK_MEMO", 2)
    formatter = PromptFormatter(tokenizer)
    for text in ("one chunk", "two chunks", "one chunk", "three chunks"):
        formatter.chunk_ids(text)
    assert list(formatter._chunk_memo) == ["one chunk", "three chunks"]
    assert formatter.chunk_ids("two chunks") == list(tokenizer("two chunks\n\n", add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_chunk_is_refused(tokenizer, text):
    with pytest.raises(EmptyInputError, match="empty"):
        PromptFormatter(tokenizer).chunk_ids(text)
