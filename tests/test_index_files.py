"""Saved-index files: manifest validation, digests, legacy layout, and saves interrupted by a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpacket_rag.errors import CorruptIndexError
from kvpacket_rag.fileio import file_sha256
from kvpacket_rag.index_files import INDEX_FORMAT, read_manifest, save_index_files

FIELDS = {"format": INDEX_FORMAT, "dim": 4, "next_id": 2, "chunks": 2, "chunker": {"chunk_tokens": 64},
          "fingerprints": {k: "x" for k in ("model", "model_name", "tokenizer", "adapter", "dtype", "embedder",
                                             "embedder_name")}}


def writers(tag: str) -> dict:
    return {role: (lambda path, role=role: path.write_text(f"{role} {tag}\n")) for role in ("chunks", "documents", "faiss")}


def contents(directory: Path) -> dict[str, str]:
    return {role: path.read_text() for role, path in read_manifest(directory)[1].items()}


def test_save_replaces_the_previous_version_whole(tmp_path):
    save_index_files(tmp_path, writers("one"), FIELDS)
    save_index_files(tmp_path, writers("two"), FIELDS)
    assert contents(tmp_path) == {"chunks": "chunks two\n", "documents": "documents two\n", "faiss": "faiss two\n"}
    assert len(list(tmp_path.iterdir())) == 4  # the manifest and three data files: the old version is gone


def test_an_index_saved_before_versioned_names_still_opens(tmp_path):
    for role, name in (("chunks", "chunks.jsonl"), ("documents", "documents.jsonl"), ("faiss", "index.faiss")):
        (tmp_path / name).write_text(role)
    digests = {name: file_sha256(tmp_path / name) for name in ("chunks.jsonl", "documents.jsonl", "index.faiss")}
    (tmp_path / "manifest.json").write_text(json.dumps({**FIELDS, "sha256": digests}))
    assert contents(tmp_path)["faiss"] == "faiss"
    save_index_files(tmp_path, writers("new"), FIELDS)
    assert not (tmp_path / "chunks.jsonl").exists() and contents(tmp_path)["chunks"] == "chunks new\n"


def _manifest(tmp_path: Path) -> dict:
    save_index_files(tmp_path, writers("one"), FIELDS)
    return json.loads((tmp_path / "manifest.json").read_text())


BAD = [
    ("not JSON", lambda m: "{not json"),
    ("deep JSON", lambda m: "[" * 100_000),
    ("a list", lambda m: []),
    ("no format", lambda m: {k: v for k, v in m.items() if k != "format"}),
    ("empty sha256", lambda m: {**m, "sha256": {}}),
    ("sha256 not hex", lambda m: {**m, "sha256": {n: "zz" for n in m["sha256"]}}),
    ("files outside", lambda m: {**m, "files": {**m["files"], "chunks": "../../etc/passwd"}}),
    ("files missing a role", lambda m: {**m, "files": {"chunks": m["files"]["chunks"]}}),
    ("dim a string", lambda m: {**m, "dim": "4"}),
    ("next_id negative", lambda m: {**m, "next_id": -1}),
    ("fingerprints null", lambda m: {**m, "fingerprints": None}),
    ("chunker a list", lambda m: {**m, "chunker": [64]}),
]


@pytest.mark.parametrize("edit", [e for _, e in BAD], ids=[n for n, _ in BAD])
def test_a_malformed_manifest_is_a_typed_error(tmp_path, edit):
    bad = edit(_manifest(tmp_path))
    (tmp_path / "manifest.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(CorruptIndexError, match="save the index again"):
        read_manifest(tmp_path)


def test_a_damaged_or_missing_data_file_is_a_typed_error(tmp_path):
    _manifest(tmp_path)
    _, files = read_manifest(tmp_path)
    files["documents"].write_text("altered\n")
    with pytest.raises(CorruptIndexError, match="checksum"):
        read_manifest(tmp_path)
    files["documents"].unlink()
    with pytest.raises(CorruptIndexError, match="missing"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved PacketIndex"):
        read_manifest(tmp_path / "nothing")


CRASHING_SAVE = """
import os, resource, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_index_files import FIELDS, writers
from kvpacket_rag.index_files import save_index_files
how, directory = sys.argv[1], Path(sys.argv[2])
w = writers("two")
if how == "killed":  # the process dies after the new data files, before the manifest
    w["faiss"] = lambda path: (path.write_text("faiss two"), os._exit(9))
else:  # the disk fills up while the manifest is written
    resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))
save_index_files(directory, w, FIELDS)
"""


@pytest.mark.parametrize("how", ["killed", "disk full"])
def test_an_interrupted_save_leaves_the_previous_version_openable(tmp_path, how):
    save_index_files(tmp_path / "idx", writers("one"), FIELDS)
    root = str(Path(__file__).resolve().parent.parent)
    code = CRASHING_SAVE.format(tests=str(Path(__file__).resolve().parent))
    result = subprocess.run([sys.executable, "-c", code, how, str(tmp_path / "idx")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": root}, timeout=120, check=False)
    assert result.returncode != 0
    assert contents(tmp_path / "idx")["chunks"] == "chunks one\n"
    save_index_files(tmp_path / "idx", writers("three"), FIELDS)  # the next save clears the leftovers
    assert contents(tmp_path / "idx")["chunks"] == "chunks three\n" and len(list((tmp_path / "idx").iterdir())) == 4
