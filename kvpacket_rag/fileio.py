"""Small file helpers shared by the stores, the index, adapters, training files and the model cache."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Callable


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object], durable: bool = True, mode: int | None = None) -> Path:
    """Replace ``path`` in one rename with what ``write(tmp)`` writes to a temp file beside it.

    Readers see the old file or the new one, never a part. ``durable`` also fsyncs the file before the rename and
    the directory after it (so the new file survives a power cut); ``mode`` sets its permissions. The temp file is
    removed when ``write`` fails.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        if mode is not None:
            tmp.chmod(mode)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path
