"""Property-based fuzzing of the packet, quantized packet and index-manifest parsers.

Thousands of mutated headers, bytes and truncations: each parser either raises its typed error or
returns exactly what was written (never a wrong-shaped tensor, never another exception). Bounded:
fixed seeds (``derandomize``), a few hundred examples per test, no example database.
"""

from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpacket_rag.errors import CorruptIndexError, CorruptPacketError
from kvpacket_rag.index_files import INDEX_FORMAT, read_manifest, save_index_files
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.packet import encode_packet

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def tiny_packet() -> KVPacket:
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 2 + 4 + 1, 4)
    return KVPacket(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.arange(4), 2, 1,
                    "model", "tokenizer", "adapter")


PACKET = tiny_packet()
FILES = {form: encode_packet(PACKET, form) for form in ("none", "int8", "int4")}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8)


def split(data: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def paths(node, prefix=()) -> list[tuple]:
    """Every path to a value in a parsed header."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            out += paths(value, (*prefix, n))
    return out


def mutate(header: dict, path: tuple, value, delete: bool) -> None:
    node = header
    for part in path[:-1]:
        node = node[part]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value


def check_result(data: bytes, verify: bool) -> None:
    """Decode; a typed error is fine; a returned packet must be whole and consistent."""
    try:
        packet = KVPacket.from_bytes(data, verify=verify)
    except CorruptPacketError:
        return
    assert packet.keys.dim() == 4 and packet.keys.shape == packet.values.shape
    assert packet.token_ids.dtype == torch.int64 and packet.token_ids.dim() == 1
    assert packet.length == packet.n_header + packet.token_ids.numel() + packet.n_trailer
    assert packet.n_header >= 0 and packet.n_trailer >= 0
    if verify:  # the digest holds, so it is the packet that was written
        assert packet.key == PACKET.key and packet.keys.shape == PACKET.keys.shape


FORMS = st.sampled_from(sorted(FILES))


@FUZZ
@given(form=FORMS, data=st.data(), value=JSON | st.text(max_size=12), delete=st.booleans(), verify=st.booleans())
def test_mutated_header_fields(form, data, value, delete, verify):
    header, body = split(FILES[form])
    path = data.draw(st.sampled_from(paths(header)))
    mutate(header, path, value, delete)
    check_result(join(header, body), verify)


@FUZZ
@given(form=FORMS, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       verify=st.booleans())
def test_flipped_bytes(form, flips, verify):
    data = bytearray(FILES[form])
    for position, mask in flips:
        data[position % len(data)] ^= mask
    check_result(bytes(data), verify)


@FUZZ
@given(form=FORMS, cut=st.integers(0, 10**6), junk=st.binary(max_size=64), verify=st.booleans())
def test_truncated_or_extended_files(form, cut, junk, verify):
    data = FILES[form]
    check_result(data[: cut % (len(data) + 1)] + junk, verify)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), JSON, max_size=5), body=st.binary(max_size=256))
def test_arbitrary_headers(header, body):
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    check_result(len(raw).to_bytes(8, "little") + raw + body, verify=False)


FIELDS = {"format": INDEX_FORMAT, "dim": 4, "next_id": 2, "chunks": 2, "chunker": {"chunk_tokens": 64},
          "fingerprints": {k: "x" for k in ("model", "model_name", "tokenizer", "adapter", "dtype", "embedder",
                                             "embedder_name")}}


@settings(FUZZ, max_examples=300)
@given(data=st.data(), value=JSON, delete=st.booleans())
def test_mutated_index_manifests(tmp_path_factory, data, value, delete):
    directory = tmp_path_factory.mktemp("idx")
    save_index_files(directory, {r: (lambda p: p.write_text("x")) for r in ("chunks", "documents", "faiss")}, FIELDS)
    manifest = json.loads((directory / "manifest.json").read_text())
    path = data.draw(st.sampled_from(paths(manifest)))
    mutate(manifest, path, value, delete)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    try:
        parsed, files = read_manifest(directory)
    except CorruptIndexError:
        return
    assert all(f.parent == directory and f.is_file() for f in files.values())  # never outside the index
    assert type(parsed["dim"]) is int and not any(isinstance(v, float) and math.isnan(v) for v in parsed.values())
