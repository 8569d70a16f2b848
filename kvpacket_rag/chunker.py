"""Splitting documents into chunks measured in the language model's own tokens.

Every chunk becomes one KV packet, so its size is counted with the LLM's tokenizer (not words or
characters). Cuts fall between sentences (or lines) where possible; a sentence longer than a chunk
is cut between words, or between tokens as a last resort. Optional overlap repeats whole trailing
sentences of a chunk at the start of the next.

Example:
    >>> chunker = Chunker(engine.model.tokenizer, chunk_tokens=200, overlap_tokens=30)
    >>> for chunk in chunker.split(long_text):
    ...     chunk.text, chunk.n_tokens, (chunk.start, chunk.end)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import EmptyInputError

# A cut may follow sentence-final punctuation (with closing quotes/brackets) plus whitespace, or any line break.
_BOUNDARY = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n+")
_TOKENIZE_BATCH = 1024


@dataclass(frozen=True)
class ChunkerConfig:
    """Chunk sizes, in tokens of the language model.

    Attributes:
        chunk_tokens: most tokens in one chunk (the chunk text alone, stripped; the packet adds a separator
            token and the adapter's header/trailer). At least 8.
        overlap_tokens: up to this many tokens of whole trailing sentences of a chunk are repeated at the start
            of the next one (0 = no overlap). Must be below ``chunk_tokens``.
    """

    chunk_tokens: int = 200
    overlap_tokens: int = 0

    def __post_init__(self) -> None:
        if self.chunk_tokens < 8:
            raise ValueError(f"chunk_tokens must be >= 8, got {self.chunk_tokens}")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError(f"overlap_tokens must be in [0, chunk_tokens), got {self.overlap_tokens}")


@dataclass(frozen=True)
class TextChunk:
    """One chunk of a document.

    Attributes:
        text: the chunk text, ``document[start:end]`` (no leading/trailing whitespace).
        start, end: character offsets in the document.
        n_tokens: tokens of ``text`` alone under the chunker's tokenizer (<= ``chunk_tokens``).
    """

    text: str
    start: int
    end: int
    n_tokens: int


@dataclass
class _Span:
    start: int
    end: int
    n_tokens: int


class Chunker:
    """Token-aware, sentence-friendly document splitter.

    Args:
        tokenizer: the language model's Hugging Face tokenizer (sizes are counted in its tokens).
        chunk_tokens, overlap_tokens: see `ChunkerConfig`.
        config: a `ChunkerConfig` instead of the two numbers.

    Work is linear in the document length; documents of many megabytes are fine.
    """

    def __init__(self, tokenizer, chunk_tokens: int = 200, overlap_tokens: int = 0, config: ChunkerConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or ChunkerConfig(chunk_tokens, overlap_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text.strip()`` alone (no special tokens)."""
        return len(self._encode([text.strip()])[0])

    def split(self, text: str) -> list[TextChunk]:
        """Chunks of ``text`` in document order, each of at most ``chunk_tokens`` tokens.

        Raises:
            EmptyInputError: ``text`` is empty or only whitespace.
        """
        if not isinstance(text, str):
            raise TypeError(f"a document must be a str, got {type(text).__name__}")
        if not text.strip():
            raise EmptyInputError("a document is empty or whitespace; drop it before ingesting")
        spans = self._spans(text)
        return list(self._pack(text, spans))

    # ---- sentences ------------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], offsets: bool = False):
        encoded = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
        return (encoded["input_ids"], encoded["offset_mapping"]) if offsets else encoded["input_ids"]

    def _sentence_bounds(self, text: str) -> Iterator[tuple[int, int]]:
        """Character spans of sentences/lines, whitespace trimmed, in order."""
        position = 0
        for match in _BOUNDARY.finditer(text):
            yield from _trimmed(text, position, match.end())
            position = match.end()
        yield from _trimmed(text, position, len(text))

    def _spans(self, text: str) -> list[_Span]:
        bounds = list(self._sentence_bounds(text))
        spans: list[_Span] = []
        limit = self.config.chunk_tokens
        for first in range(0, len(bounds), _TOKENIZE_BATCH):
            batch = bounds[first : first + _TOKENIZE_BATCH]
            ids = self._encode([text[s:e] for s, e in batch])
            for (start, end), tokens in zip(batch, ids):
                if len(tokens) <= limit:
                    spans.append(_Span(start, end, len(tokens)))
                else:
                    spans.extend(self._cut_long(text, start, end, limit))
        return spans

    def _cut_long(self, text: str, start: int, end: int, limit: int) -> list[_Span]:
        """Pieces of one over-long sentence, cut between words where possible."""
        ids, offsets = self._encode([text[start:end]], offsets=True)
        offsets = offsets[0]
        pieces: list[_Span] = []
        first = 0
        while first < len(offsets):
            last = min(first + limit, len(offsets))  # exclusive token index
            if last < len(offsets):
                last = _word_cut(text, start, offsets, first, last)
            piece_start = start + offsets[first][0]
            piece_end = start + offsets[last - 1][1]
            pieces.extend(_Span(s, e, last - first) for s, e in _trimmed(text, piece_start, piece_end))
            first = last
        return pieces

    # ---- packing --------------------------------------------------------------------------------

    def _pack(self, text: str, spans: list[_Span]) -> Iterator[TextChunk]:
        limit, overlap = self.config.chunk_tokens, self.config.overlap_tokens
        queue = list(reversed(spans))  # next span at the end
        current: list[_Span] = []
        carried = 0  # leading spans of `current` repeated from the previous chunk (overlap)
        while queue or len(current) > carried:
            span = queue.pop() if queue else None
            if span is not None and (not current or sum(s.n_tokens for s in current) + span.n_tokens <= limit):
                current.append(span)
                continue
            if span is not None:
                queue.append(span)
            chunk, used, leftover = self._fit(text, current)
            if chunk is None or used <= carried:
                # nothing new fits after the overlap (or one piece must be cut tighter): retry without it
                queue.extend(reversed(current[carried:] if carried else leftover))
                current, carried = [], 0
                continue
            yield chunk
            queue.extend(reversed(leftover))
            current = _tail(current[:used], overlap) if queue else []
            carried = len(current)

    def _fit(self, text: str, spans: list[_Span]) -> tuple[TextChunk | None, int, list[_Span]]:
        """The chunk of the longest prefix of ``spans`` that fits by exact count: ``(chunk, spans used, rest)``.

        When even the first span alone is too long (its tokens differ alone and in context), returns
        ``(None, 0, pieces of it cut tighter + the other spans)``.
        """
        limit = self.config.chunk_tokens
        for used in range(len(spans), 0, -1):
            start, end = spans[0].start, spans[used - 1].end
            n_tokens = self.count_tokens(text[start:end])
            if n_tokens <= limit:
                return TextChunk(text[start:end], start, end, n_tokens), used, spans[used:]
        first = spans[0]
        alone = self.count_tokens(text[first.start:first.end])
        tighter = max(1, limit - (alone - limit) - 1)
        return None, 0, self._cut_long(text, first.start, first.end, tighter) + spans[1:]


def _trimmed(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start:
        yield start, end


def _word_cut(text: str, base: int, offsets, first: int, last: int) -> int:
    """The latest token index in (first + 3/4 window, last] starting a word, else ``last``."""
    floor = first + max(1, (last - first) * 3 // 4)
    for index in range(last, floor, -1):
        char = base + offsets[index][0]
        if char < len(text) and (text[char].isspace() or (char > 0 and text[char - 1].isspace())):
            return index
    return last


def _tail(spans: list[_Span], budget: int) -> list[_Span]:
    """The longest run of trailing ``spans`` whose tokens add up to at most ``budget``."""
    kept: list[_Span] = []
    total = 0
    for span in reversed(spans):
        if total + span.n_tokens > budget:
            break
        kept.insert(0, span)
        total += span.n_tokens
    return kept
