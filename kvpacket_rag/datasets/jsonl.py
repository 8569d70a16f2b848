"""User-supplied samples from a JSON Lines file.

One sample per non-blank line::

    {"chunks": ["first passage", "second passage"], "question": "...", "answers": ["..."]}

``answers`` is optional (training-only data); an optional string ``id``
overrides the default id ``"<file stem>/<line number>"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import DatasetError, Sample

__all__ = ["jsonl_samples"]

FORMAT_HINT = (
    'each line must be an object like {"chunks": ["..."], "question": "...", "answers": ["..."]}'
)


def jsonl_samples(path: str | Path, n: int | None = None) -> list[Sample]:
    """Read the samples of the JSONL file ``path``, the first ``n`` of them if ``n`` is given.

    The whole file is validated even when ``n`` is smaller than its length.

    Raises:
        DatasetError: if the file is missing or has no samples, if ``n`` exceeds
            the number of samples, or if a line is not valid JSON, lacks a field,
            has a field of the wrong type or an empty chunk (the message gives
            the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file; pass the path of a .jsonl file ({FORMAT_HINT})")
    with path.open(encoding="utf-8") as f:
        lines = enumerate(f, start=1)
        samples = [_parse_line(path, lineno, line) for lineno, line in lines if line.strip()]
    if not samples:
        raise DatasetError(f"{path}: file has no samples; {FORMAT_HINT}")
    if n is not None and not 0 <= n <= len(samples):
        raise DatasetError(f"{path}: has {len(samples)} samples; asked for {n}")
    return samples[:n]


def _parse_line(path: Path, lineno: int, line: str) -> Sample:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        message = f"{where}: invalid JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}"
        raise DatasetError(message) from e
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DatasetError(f"{where}: expected a JSON object, got {kind}; {FORMAT_HINT}")
    chunks = _string_list(record, "chunks", where, required=True)
    answers = _string_list(record, "answers", where, required=False)
    question, sample_id = record.get("question"), record.get("id", f"{path.stem}/{lineno}")
    if not isinstance(question, str):
        raise DatasetError(f"{where}: field 'question' must be a string; {FORMAT_HINT}")
    if not isinstance(sample_id, str):
        raise DatasetError(f"{where}: field 'id' must be a string if present")
    try:
        return Sample(id=sample_id, chunks=chunks, question=question, answers=answers)
    except ValueError as e:
        raise DatasetError(f"{where}: {e}") from e


def _string_list(record: dict[str, Any], field: str, where: str, required: bool) -> tuple[str, ...]:
    if field not in record:
        if required:
            raise DatasetError(f"{where}: missing field {field!r}; {FORMAT_HINT}")
        return ()
    value = record[field]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"{where}: field {field!r} must be a list of strings; {FORMAT_HINT}")
    return tuple(value)
