"""Ways to make a packet file lie: rewrite its safetensors header while keeping its tensor bytes."""

from __future__ import annotations

import json

import xxhash
from safetensors.torch import save

from kvpacket_rag.packet import KVPacket


def split(data: bytes) -> tuple[dict, bytes]:
    """The parsed header and the tensor bytes of a safetensors file."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict | bytes, body: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def rewrite(data: bytes, edit) -> bytes:
    """``data`` with ``edit(header)`` applied to its header (digest left as it was)."""
    header, body = split(data)
    edit(header)
    return join(header, body)


def legacy_bytes(packet: KVPacket) -> bytes:
    """The packet as files were written before the header digest: a checksum of the tensor bytes only."""
    tensors = {"keys": packet.keys.contiguous(), "values": packet.values.contiguous(), "token_ids": packet.token_ids}
    checksum = xxhash.xxh3_128()
    for name in sorted(tensors):
        checksum.update(tensors[name].reshape(-1).view(__import__("torch").uint8).numpy())
    return save(tensors, metadata={**packet.metadata(), "checksum": checksum.hexdigest()})


def _set(path: tuple, value):
    def edit(header: dict) -> None:
        node = header
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return edit


def _swap_dims(a: int, b: int):
    def edit(header: dict) -> None:
        for name in ("keys", "values"):
            shape = header[name]["shape"]
            shape[a], shape[b] = shape[b], shape[a]
    return edit


def _move_adapter(header: dict) -> None:
    meta = header["__metadata__"]
    meta["n_header"], meta["n_trailer"] = str(int(meta["n_header"]) + 1), str(int(meta["n_trailer"]) - 1)


# Each lie: (name, edit of the header). All keep the tensor bytes and the total length.
LIES = [
    ("entry not a dict", _set(("keys",), [1, 2, 3])),
    ("negative shape", _set(("keys", "shape", 0), -2)),
    ("float shape", _set(("keys", "shape", 1), 2.0)),
    ("string offsets", _set(("values", "data_offsets"), ["0", "64"])),
    ("null dtype", _set(("token_ids", "dtype"), None)),
    ("list dtype", _set(("keys", "dtype"), ["F32"])),
    ("metadata not strings", _set(("__metadata__", "n_header"), 2)),
    ("metadata a list", _set(("__metadata__",), ["format"])),
    ("n_header not a number", _set(("__metadata__", "n_header"), "two")),
    ("negative n_trailer", _set(("__metadata__", "n_trailer"), "-1")),
    ("extra not an object", _set(("__metadata__", "extra"), "[" * 5000)),
    ("layers <-> heads", _swap_dims(0, 1)),
    ("heads <-> tokens", _swap_dims(1, 2)),
    ("heads <-> head_dim", _swap_dims(1, 3)),
    ("adapter sizes moved", _move_adapter),
    ("token_ids 2-D", _set(("token_ids", "shape"), [1, 12])),
]

def _scalar_codes(header: dict) -> None:
    start = header["keys"]["data_offsets"][0]
    header["keys"].update(shape=[], data_offsets=[start, start + 1])


# Quantized files only.
QUANTIZED_LIES = [
    ("codes of shape []", _scalar_codes),
    ("scale of another shape", _set(("key_scale", "shape"), [1, 1, 1, 1])),
    ("head_dim lies", _set(("__metadata__", "head_dim"), "7")),
    ("quantization unknown", _set(("__metadata__", "quantization"), "int3")),
]

DEEP_JSON = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
