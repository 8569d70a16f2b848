"""The KV packet and its file format.

A packet is the attention KV cache of one wrapped chunk ``[header; chunk;
trailer]`` computed alone at local positions ``0..T-1`` (``T = n_header + L +
n_trailer``). It is immutable and independent of any other chunk, question or
position.

File format (``kvpacket/1``): a safetensors file with tensors ``keys`` and
``values`` ``[layers, kv_heads, T, head_dim]`` (keys after RoPE) and
``token_ids`` int64 ``[L]``; its string metadata carries the format version,
the model / tokenizer / adapter fingerprints, ``n_header``, ``n_trailer``,
``dtype``, ``quantization`` and an xxh3-128 ``checksum`` of the tensor bytes.
Decoding maps tensors onto the given buffer without copying.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors.torch import save

from .errors import CorruptPacketError, IncompatiblePacketError

FORMAT = "kvpacket/1"
FORMAT_VERSION = 1

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
           "I8": torch.int8, "U8": torch.uint8}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` / ``bfloat16`` / ``float16``."""
    return _DTYPE_NAMES[dtype]


def packet_key(
    token_ids: list[int] | torch.Tensor,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    adapter_fingerprint: str,
    dtype: torch.dtype | str,
    quantization: str = "none",
) -> str:
    """Content address of a packet: sha256 hex over everything its bytes depend on.

    A changed model, tokenizer, adapter, dtype or quantization gives a new key, so a stale
    packet can never be reused silently.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().numpy().tobytes()
    dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
    head = f"{FORMAT_VERSION}|{model_fingerprint}|{tokenizer_fingerprint}|{adapter_fingerprint}|{dtype}|{quantization}|"
    return hashlib.sha256(head.encode() + ids).hexdigest()


@dataclass(frozen=True)
class KVPacket:
    """One chunk's KV cache at local positions, with its provenance.

    Attributes:
        keys: ``[layers, kv_heads, T, head_dim]`` keys after RoPE at positions ``0..T-1``.
        values: same shape as ``keys``.
        token_ids: int64 ``[L]``, the chunk tokens (adapter positions excluded).
        n_header, n_trailer: adapter sizes; ``T == n_header + L + n_trailer``.
        model_fingerprint, tokenizer_fingerprint, adapter_fingerprint: what built it.
        quantization: ``none`` for plain tensors (quantized forms are decoded by the store).
    """

    keys: torch.Tensor
    values: torch.Tensor
    token_ids: torch.Tensor
    n_header: int
    n_trailer: int
    model_fingerprint: str
    tokenizer_fingerprint: str
    adapter_fingerprint: str
    quantization: str = "none"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.dim() != 4:
            raise CorruptPacketError(f"packet keys/values must share a 4-D shape, got {tuple(self.keys.shape)} / {tuple(self.values.shape)}")
        if self.keys.shape[2] != self.n_header + self.token_ids.numel() + self.n_trailer:
            raise CorruptPacketError(
                f"packet length {self.keys.shape[2]} != n_header + tokens + n_trailer "
                f"({self.n_header} + {self.token_ids.numel()} + {self.n_trailer})"
            )

    @property
    def length(self) -> int:
        """Positions the packet occupies, adapters included."""
        return self.keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes

    @property
    def key(self) -> str:
        return packet_key(self.token_ids, self.model_fingerprint, self.tokenizer_fingerprint,
                          self.adapter_fingerprint, self.dtype, self.quantization)

    def check_compatible(self, model_fingerprint: str, tokenizer_fingerprint: str, adapter_fingerprint: str) -> None:
        """Raise IncompatiblePacketError unless the packet was built by exactly this model/tokenizer/adapter."""
        for what, mine, theirs in (("model", self.model_fingerprint, model_fingerprint),
                                   ("tokenizer", self.tokenizer_fingerprint, tokenizer_fingerprint),
                                   ("adapter", self.adapter_fingerprint, adapter_fingerprint)):
            if mine != theirs:
                raise IncompatiblePacketError(
                    f"packet {self.key[:12]} was built by another {what} ({mine[:12]} != {theirs[:12]}); "
                    "rebuild it with `kvpacket build` for the current model and adapter."
                )

    def metadata(self) -> dict[str, str]:
        """String metadata stored in the file header (checksum excluded)."""
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model_fingerprint": self.model_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "adapter_fingerprint": self.adapter_fingerprint,
                "n_header": str(self.n_header), "n_trailer": str(self.n_trailer), "dtype": dtype_name(self.dtype),
                "quantization": self.quantization, "extra": json.dumps(self.extra)}

    def to_bytes(self) -> bytes:
        """Serialise to ``kvpacket/1`` bytes (safetensors, checksummed)."""
        tensors = {"keys": self.keys.contiguous().cpu(), "values": self.values.contiguous().cpu(),
                   "token_ids": self.token_ids.to(torch.int64).contiguous().cpu()}
        checksum = xxhash.xxh3_128()
        for name in sorted(tensors):
            checksum.update(tensors[name].reshape(-1).view(torch.uint8).numpy())
        return save(tensors, metadata={**self.metadata(), "checksum": checksum.hexdigest()})

    @classmethod
    def from_bytes(cls, buffer: bytes | bytearray | memoryview, verify: bool = True) -> "KVPacket":
        """Decode ``kvpacket/1`` bytes without copying tensor data.

        The returned tensors view ``buffer`` (keep it alive; treat them as read-only). Quantized
        files (``quantization`` int8/int4, see `kvpacket_rag.quantize`) are dequantized into new
        tensors and returned as a plain packet with the original key.

        Raises:
            CorruptPacketError: truncated, altered or foreign bytes.
        """
        header, data = _parse_safetensors(buffer)
        meta = header.pop("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise CorruptPacketError(f"not a kvpacket/1 file (format={meta.get('format')!r}); rebuild the packet")
        tensors = {}
        checksum = xxhash.xxh3_128()
        for name in sorted(header):
            info = header[name]
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data) or info["dtype"] not in _DTYPES:
                raise CorruptPacketError(f"packet tensor '{name}' points outside the file; the file is truncated")
            chunk = data[start:end]
            if verify:
                checksum.update(chunk)
            tensors[name] = _tensor_from(chunk, _DTYPES[info["dtype"]], info["shape"])
        if verify and checksum.hexdigest() != meta.get("checksum"):
            raise CorruptPacketError("packet checksum mismatch: the file was altered or truncated; delete and rebuild it")
        if meta.get("quantization", "none") != "none":  # int8/int4 codes + scales: decoded (copied) there
            from .quantize import dequantize_packet

            return dequantize_packet(tensors, meta)
        try:
            return cls(tensors["keys"], tensors["values"], tensors["token_ids"], int(meta["n_header"]),
                       int(meta["n_trailer"]), meta["model_fingerprint"], meta["tokenizer_fingerprint"],
                       meta["adapter_fingerprint"], meta.get("quantization", "none"), json.loads(meta.get("extra", "{}")))
        except KeyError as error:
            raise CorruptPacketError(f"packet metadata lacks {error}; rebuild the packet") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(self.to_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "KVPacket":
        """Read a packet file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"packet file {path} does not exist; build it with `kvpacket build`")
        return cls.from_bytes(path.read_bytes(), verify=verify)


def _parse_safetensors(buffer) -> tuple[dict, memoryview]:
    view = memoryview(buffer).cast("B")
    if len(view) < 8:
        raise CorruptPacketError("packet file is truncated (no header)")
    (size,) = struct.unpack("<Q", view[:8])
    if size > len(view) - 8 or size > 1 << 24:
        raise CorruptPacketError("packet file is truncated or not a safetensors file")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptPacketError("packet header is not valid JSON; the file is corrupt") from None
    if not isinstance(header, dict):
        raise CorruptPacketError("packet header is malformed")
    return header, view[8 + size :]


def _tensor_from(chunk: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    count = 1
    for dim in shape:
        count *= dim
    if count * torch.empty((), dtype=dtype).element_size() != len(chunk):
        raise CorruptPacketError("packet tensor size does not match its shape; the file is corrupt")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are fine: packets are immutable
        return torch.frombuffer(chunk, dtype=dtype, count=count).view(shape)
