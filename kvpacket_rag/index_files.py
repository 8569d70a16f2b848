"""The files of a saved `PacketIndex`: a validated manifest that names checksummed data files.

Layout of a saved index directory::

    manifest.json                 format, fingerprints, sizes, and the data files of this version
                                  with their sha256 digests
    chunks.<version>.jsonl        one chunk record per line
    documents.<version>.jsonl     one document entry per line
    index.<version>.faiss         the FAISS vectors

A save is crash-safe: the data files of a new version are written under new names and fsynced, then
the manifest is replaced with one atomic rename and the directory fsynced, and only then are the
previous version's files removed. A crash at any point leaves the previous or the new version whole.
Indexes saved before versioned names (``chunks.jsonl``, ``documents.jsonl``, ``index.faiss``) still
open. One process saves a given directory at a time.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import CorruptIndexError
from .fileio import atomic_write, file_sha256, fsync_dir

INDEX_FORMAT = "kvpacket-index/1"
MANIFEST = "manifest.json"
ROLES = {"chunks": "chunks.{}.jsonl", "documents": "documents.{}.jsonl", "faiss": "index.{}.faiss"}
LEGACY_FILES = {"chunks": "chunks.jsonl", "documents": "documents.jsonl", "faiss": "index.faiss"}
FINGERPRINTS = ("model", "model_name", "tokenizer", "adapter", "dtype", "embedder", "embedder_name")
_VERSIONED = re.compile(r"(?:chunks|documents)\.[0-9a-f]{12}\.jsonl|index\.[0-9a-f]{12}\.faiss")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_index_files(directory: Path, writers: dict[str, Callable[[Path], None]], manifest: dict) -> dict[str, Path]:
    """Write a new version of an index: each ``writers[role](path)`` writes one data file, then the manifest.

    Args:
        directory: the index directory (created if needed).
        writers: one callable per role in `ROLES`, writing that file at the path it is given.
        manifest: the manifest fields besides ``files`` and ``sha256`` (added here).

    Returns:
        The data file of each role.

    Raises:
        OSError: a write failed; the previous version is untouched and still opens.
    """
    directory.mkdir(parents=True, exist_ok=True)
    version = secrets.token_hex(6)
    files = {role: directory / pattern.format(version) for role, pattern in ROLES.items()}
    try:
        for role, path in files.items():
            writers[role](path)
            fsync_dir(path)
        manifest = {**manifest, "files": {role: path.name for role, path in files.items()},
                    "sha256": {path.name: file_sha256(path) for path in files.values()}}
        atomic_write(directory / MANIFEST, lambda tmp: tmp.write_bytes((json.dumps(manifest, indent=2) + "\n").encode()))
    except BaseException:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise
    _remove_other_versions(directory, {path.name for path in files.values()})
    return files


def read_manifest(directory: Path) -> tuple[dict, dict[str, Path]]:
    """The validated manifest of a saved index and its data file per role, digests checked.

    Raises:
        FileNotFoundError: no manifest in ``directory``.
        CorruptIndexError: the manifest is not JSON, lacks or mistypes a field, names a file
            outside the directory, or a data file is missing or fails its digest.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved PacketIndex (no {MANIFEST}); create one with "
                                "PacketIndex(...).add_documents(...).save(directory)")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        raise CorruptIndexError(f"{path} is not valid JSON (damaged or partially written); save the index again") from None
    files = _validate(manifest, path)
    for role, file in files.items():
        if not file.is_file():
            raise CorruptIndexError(f"{file} ({role}) named by {path} is missing; save the index again")
        if file_sha256(file) != manifest["sha256"][file.name]:
            raise CorruptIndexError(f"{file} does not match its checksum in the manifest (damaged or partially "
                                    "written); save the index again")
    return manifest, files


def _validate(manifest, path: Path) -> dict[str, Path]:
    """Check every manifest field's type; return the data file of each role."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CorruptIndexError(f"{path}: {what}; the manifest is damaged or not a PacketIndex manifest, "
                                    "save the index again")

    need(isinstance(manifest, dict), "not a JSON object")
    need(manifest.get("format") == INDEX_FORMAT, f"format is {str(manifest.get('format'))[:40]!r}, expected {INDEX_FORMAT!r}")
    prints = manifest.get("fingerprints")
    need(isinstance(prints, dict) and all(isinstance(prints.get(k), str) for k in FINGERPRINTS),
         f"'fingerprints' must map {', '.join(FINGERPRINTS)} to strings")
    for field in ("dim", "next_id", "chunks"):
        need(type(manifest.get(field)) is int and manifest[field] >= (field == "dim"), f"'{field}' must be a count")
    need(isinstance(manifest.get("chunker"), dict), "'chunker' must be an object")
    names = manifest.get("files", LEGACY_FILES)
    need(isinstance(names, dict) and set(names) == set(ROLES), f"'files' must name the {', '.join(ROLES)} files")
    need(all(isinstance(n, str) and (n in LEGACY_FILES.values() or _VERSIONED.fullmatch(n)) for n in names.values()),
         "'files' names a file this index does not write")
    digests = manifest.get("sha256")
    need(isinstance(digests, dict) and all(isinstance(digests.get(n), str) and _SHA256.fullmatch(digests[n])
                                           for n in names.values()),
         "'sha256' must hold the digest of every data file")
    return {role: path.parent / name for role, name in names.items()}


def _remove_other_versions(directory: Path, keep: set[str]) -> None:
    for path in directory.iterdir():
        if path.name not in keep and (path.name in LEGACY_FILES.values() or _VERSIONED.fullmatch(path.name)):
            path.unlink(missing_ok=True)
