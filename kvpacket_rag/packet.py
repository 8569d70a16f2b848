"""The KV packet and its file format.

A packet is the attention KV cache of one wrapped chunk ``[header; chunk;
trailer]`` computed alone at local positions ``0..T-1`` (``T = n_header + L +
n_trailer``). It is immutable and independent of any other chunk, question or
position.

File format (``kvpacket/1``): a safetensors file with tensors ``keys`` and
``values`` ``[layers, kv_heads, T, head_dim]`` (keys after RoPE) and
``token_ids`` int64 ``[L]``; its string metadata carries the format version,
the model / tokenizer / adapter fingerprints, ``n_header``, ``n_trailer``,
``dtype``, ``quantization`` and an xxh3-128 ``digest`` over that metadata and every tensor's name,
dtype, shape and bytes, so a header that lies about shapes or adapter sizes is caught like a flipped
byte. Files written before the digest carry a ``checksum`` of the tensor bytes only and are still
read. A store with a signing key adds ``signature``: an HMAC-SHA256 of the same content.
Decoding validates every header field before it maps tensors onto the given buffer without copying.

Quantized files (``quantization`` int8 / int4, math in `kvpacket_rag.quantize`) have the same
header; ``dtype`` is the dtype the packet is restored to and ``head_dim`` the unpacked width. Their
tensors are ``keys`` / ``values`` uint8 codes ``[layers, kv_heads, T, head_dim]`` (int8) or
``[..., head_dim / 2]`` (int4, two codes per byte), float32 ``key_scale``, ``key_zero``,
``value_scale``, ``value_zero`` ``[layers, kv_heads, 1, head_dim]`` and ``token_ids``. They decode to a
`QuantizedPacket`: codes stay views of the buffer and are dequantized where they are used (straight
into the assembly buffer at question time), under the key of the packet that was quantized.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash
from safetensors.torch import save

from .errors import CorruptPacketError, IncompatiblePacketError, UntrustedPacketError
from .fileio import atomic_write
from .quantize import BITS, QuantizedTensor, check_quantization, quantize

FORMAT = "kvpacket/1"
FORMAT_VERSION = 1

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
           "I8": torch.int8, "U8": torch.uint8}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


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
        quantization: ``none``: the key names the exact packet (a `QuantizedPacket` keeps the key
            of the packet it approximates).
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
        if self.n_header < 0 or self.n_trailer < 0 or self.token_ids.dim() != 1:
            raise CorruptPacketError(f"packet adapter sizes must be >= 0 and token_ids a vector, got n_header "
                                     f"{self.n_header}, n_trailer {self.n_trailer}, token_ids {tuple(self.token_ids.shape)}")
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
        """Bytes of the tensors the packet holds."""
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes

    @property
    def encoding(self) -> str:
        """How the tensors are held: ``none`` (plain keys/values), ``int8`` or ``int4`` (`QuantizedPacket`)."""
        return "none"

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

    def to_bytes(self, signing_key: bytes | None = None) -> bytes:
        """Serialise to ``kvpacket/1`` bytes (safetensors) sealed by a digest of header and tensors.

        Args:
            signing_key: when given, also sign the file (HMAC-SHA256 over the same content), so a
                reader holding the key can tell it from a planted one.
        """
        tensors = {"keys": self.keys.contiguous().cpu(), "values": self.values.contiguous().cpu(),
                   "token_ids": self.token_ids.to(torch.int64).contiguous().cpu()}
        return seal(tensors, self.metadata(), signing_key)

    @classmethod
    def from_bytes(cls, buffer: bytes | bytearray | memoryview, verify: bool = True,
                   signing_key: bytes | None = None) -> "KVPacket":
        """Decode ``kvpacket/1`` bytes without copying tensor data.

        The returned tensors view ``buffer`` (keep it alive; treat them as read-only). Quantized
        files give a `QuantizedPacket` whose codes view ``buffer`` and whose ``key`` is the key of
        the packet that was quantized. Every header field is checked (types, shapes, offsets,
        names) before a tensor is made; files written before the header digest existed are still
        read, their tensors checked by the older tensor checksum.

        Args:
            verify: check the digest (skip only for bytes already verified).
            signing_key: require a valid signature made with this key (checked even without ``verify``).

        Raises:
            CorruptPacketError: truncated, altered, foreign or malformed bytes.
            UntrustedPacketError: ``signing_key`` given and the file is unsigned or signed with another key.
        """
        meta, specs, chunks = read_sealed(buffer, verify=verify, signing_key=signing_key)
        tensors = {name: _tensor_from(chunks[name], _DTYPES[spec.dtype], spec.shape) for name, spec in specs.items()}
        if meta.get("quantization", "none") != "none":
            return QuantizedPacket.from_tensors(tensors, meta)
        if set(tensors) != {"keys", "values", "token_ids"}:
            raise CorruptPacketError(f"packet holds tensors {[n[:20] for n in sorted(tensors)][:8]}, expected keys, "
                                     "values, token_ids; "
                                     "rebuild the packet")
        dtype = _DTYPE_NAMES.get(tensors["keys"].dtype)
        if dtype is None or dtype != meta.get("dtype") or tensors["values"].dtype != tensors["keys"].dtype:
            raise CorruptPacketError(f"packet tensors are {tensors['keys'].dtype}/{tensors['values'].dtype} but the "
                                     f"header says {str(meta.get('dtype'))[:20]!r}; rebuild the packet")
        check_token_ids(tensors["token_ids"])
        return cls(tensors["keys"], tensors["values"], tensors["token_ids"], *packet_fields(meta))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file, fsync, rename, directory fsync)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "KVPacket":
        """Read a packet file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"packet file {path} does not exist; build it with `kvpacket build`")
        return cls.from_bytes(path.read_bytes(), verify=verify)


class QuantizedPacket(KVPacket):
    """A packet held in its stored int8 / int4 form: codes and per-channel scales.

    It stands for the packet it approximates: same ``key``, ``dtype``, ``length`` and metadata. The
    codes usually view a file's bytes (zero copy); `keys` and `values` dequantize into new tensors
    on each access, and assembly decodes them straight into its buffer (see
    `kvpacket_rag.kvcache.assemble`). `nbytes` counts the quantized bytes actually held, so a memory
    tier fits two (int8) or four (int4) times more of them than of plain bf16 packets.

    Args:
        quantized_keys, quantized_values: the two tensors (same shape and bits).
        dtype: the dtype the packet is restored to.
        token_ids, n_header, n_trailer, fingerprints, extra: as for `KVPacket`.
    """

    def __init__(self, quantized_keys: QuantizedTensor, quantized_values: QuantizedTensor, dtype: torch.dtype,
                 token_ids: torch.Tensor, n_header: int, n_trailer: int, model_fingerprint: str,
                 tokenizer_fingerprint: str, adapter_fingerprint: str, extra: dict | None = None):
        fields = {"quantized_keys": quantized_keys, "quantized_values": quantized_values, "_dtype": dtype,
                  "token_ids": token_ids, "n_header": n_header, "n_trailer": n_trailer,
                  "model_fingerprint": model_fingerprint, "tokenizer_fingerprint": tokenizer_fingerprint,
                  "adapter_fingerprint": adapter_fingerprint, "quantization": "none", "extra": extra or {}}
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        if quantized_keys.shape != quantized_values.shape or quantized_keys.bits != quantized_values.bits:
            raise CorruptPacketError("quantized keys and values differ in shape or bits")
        if dtype not in _DTYPE_NAMES:
            raise CorruptPacketError(f"quantized packet restores to unsupported dtype {dtype}")
        self._check_sizes(quantized_keys.shape[2])

    def _check_sizes(self, positions: int) -> None:
        if self.n_header < 0 or self.n_trailer < 0 or self.token_ids.dim() != 1:
            raise CorruptPacketError(f"packet adapter sizes must be >= 0 and token_ids a vector, got n_header "
                                     f"{self.n_header}, n_trailer {self.n_trailer}, token_ids {tuple(self.token_ids.shape)}")
        if positions != self.n_header + self.token_ids.numel() + self.n_trailer:
            raise CorruptPacketError(f"packet length {positions} != n_header + tokens + n_trailer "
                                     f"({self.n_header} + {self.token_ids.numel()} + {self.n_trailer})")

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "QuantizedPacket":
        """The packet of a (digest-verified) quantized file's tensors and metadata; nothing is copied.

        Raises:
            CorruptPacketError: missing or extra tensors, bad metadata, or shapes that do not fit together.
        """
        quantization = meta.get("quantization")
        if quantization not in BITS:
            raise CorruptPacketError(f"unknown packet quantization {str(quantization)[:20]!r}; rebuild the packet")
        if set(tensors) != _QUANTIZED_TENSORS:
            raise CorruptPacketError(f"quantized packet holds tensors {[n[:20] for n in sorted(tensors)][:8]}, "
                                     f"expected {sorted(_QUANTIZED_TENSORS)}; rebuild the packet")
        dtype = _NAMED_DTYPES.get(meta.get("dtype", ""))
        if dtype is None:
            raise CorruptPacketError(f"quantized packet restores to unknown dtype {str(meta.get('dtype'))[:20]!r}; "
                                     "rebuild the packet")
        check_token_ids(tensors["token_ids"])
        bits = BITS[quantization]
        _check_quantized_shapes(tensors, meta, bits)
        parts = [QuantizedTensor(tensors[name], tensors[f"{prefix}_scale"], tensors[f"{prefix}_zero"], bits)
                 for name, prefix in (("keys", "key"), ("values", "value"))]
        n_header, n_trailer, model, tokenizer, adapter, _, extra = packet_fields(meta)
        return cls(*parts, dtype, tensors["token_ids"], n_header, n_trailer, model, tokenizer, adapter, extra)

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        """Dequantized keys (a new tensor on each access)."""
        return self.quantized_keys.dequantize(self._dtype)

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        """Dequantized values (a new tensor on each access)."""
        return self.quantized_values.dequantize(self._dtype)

    @property
    def length(self) -> int:
        return self.quantized_keys.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        return self.quantized_keys.nbytes + self.quantized_values.nbytes + self.token_ids.nbytes

    @property
    def encoding(self) -> str:
        return "int8" if self.quantized_keys.bits == 8 else "int4"

    def dequantized(self) -> KVPacket:
        """The plain packet these codes stand for (new tensors)."""
        return KVPacket(self.keys, self.values, self.token_ids, self.n_header, self.n_trailer, self.model_fingerprint,
                        self.tokenizer_fingerprint, self.adapter_fingerprint, extra=self.extra)

    def to_bytes(self, signing_key: bytes | None = None) -> bytes:
        """Plain ``kvpacket/1`` bytes of the dequantized packet (`encode_packet` re-encodes the codes as they are)."""
        return self.dequantized().to_bytes(signing_key)

    def __repr__(self) -> str:
        return (f"QuantizedPacket({self.encoding}, key={self.key[:12]}, positions={self.length}, "
                f"dtype={dtype_name(self._dtype)})")

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def encode_packet(packet: KVPacket, quantization: str = "none", signing_key: bytes | None = None) -> bytes:
    """``kvpacket/1`` bytes of ``packet``, quantized as asked (``none`` gives `KVPacket.to_bytes`).

    A `QuantizedPacket` is written from its codes when asked for its own form (no re-quantization),
    and dequantized first otherwise.

    Args:
        signing_key: sign the file with this key (see `KVPacket.to_bytes`).

    Raises:
        ValueError: unknown quantization, or a packet whose ``quantization`` is not ``none``.
    """
    check_quantization(quantization)
    if packet.quantization != "none":
        raise ValueError(f"packet {packet.key[:12]} is already {packet.quantization}; store the original packet")
    if quantization == "none":
        return packet.to_bytes(signing_key)
    if isinstance(packet, QuantizedPacket) and packet.encoding == quantization:
        keys, values = packet.quantized_keys, packet.quantized_values
    else:
        bits = BITS[quantization]
        keys, values = quantize(packet.keys, bits), quantize(packet.values, bits)
    tensors = {"keys": keys.codes, "values": values.codes, "key_scale": keys.scale, "key_zero": keys.zero,
               "value_scale": values.scale, "value_zero": values.zero,
               "token_ids": packet.token_ids.to(torch.int64).contiguous().cpu()}
    metadata = {**packet.metadata(), "quantization": quantization, "head_dim": str(keys.shape[-1])}
    return seal(tensors, metadata, signing_key)


def reconstruction_error(packet: KVPacket, quantization: str) -> dict[str, float]:
    """Errors of a quantize/dequantize round trip of ``packet`` (computed in float32).

    Returns:
        ``{keys,values}_{max_abs,rel_rms}``: max absolute error and RMS error / RMS of the tensor.
    """
    restored = KVPacket.from_bytes(encode_packet(packet, quantization))
    out = {}
    for name in ("keys", "values"):
        want = getattr(packet, name).float()
        diff = getattr(restored, name).float() - want
        out[f"{name}_max_abs"] = float(diff.abs().max()) if diff.numel() else 0.0
        rms = float(want.pow(2).mean().sqrt()) if want.numel() else 0.0
        out[f"{name}_rel_rms"] = float(diff.pow(2).mean().sqrt()) / rms if rms else 0.0
    return out


_QUANTIZED_TENSORS = {"keys", "values", "key_scale", "key_zero", "value_scale", "value_zero", "token_ids"}
_NAMED_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


def _check_quantized_shapes(tensors: dict[str, torch.Tensor], meta: dict[str, str], bits: int) -> None:
    """CorruptPacketError unless codes and scales fit one ``[layers, kv_heads, T, head_dim]`` packet."""
    codes = tensors["keys"]
    head_dim = int_field(meta, "head_dim", limit=1 << 20) if "head_dim" in meta else codes.shape[-1] * (8 // bits)
    problem = None
    if codes.dim() != 4 or tensors["values"].shape != codes.shape:
        problem = f"codes of shapes {tuple(codes.shape)} / {tuple(tensors['values'].shape)} are not one 4-D shape"
    elif codes.shape[-1] * (8 // bits) != head_dim:
        problem = f"codes of width {codes.shape[-1]} do not hold head_dim {head_dim} at {bits} bits"
    else:
        want = (*codes.shape[:2], 1, head_dim)
        for name in ("key_scale", "key_zero", "value_scale", "value_zero"):
            if tensors[name].shape != want or tensors[name].dtype != torch.float32:
                problem = f"'{name}' is {tensors[name].dtype} {tuple(tensors[name].shape)}, expected float32 {want}"
    for name in ("keys", "values"):
        if tensors[name].dtype != torch.uint8:
            problem = f"codes '{name}' are {tensors[name].dtype}, expected uint8"
    if problem:
        raise CorruptPacketError(f"quantized packet tensors do not fit together: {problem}; rebuild the packet")


class TensorSpec(NamedTuple):
    """One validated tensor entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


_MAX_DIMS = 8
_MAX_DIM = 1 << 40
_SEALS = ("checksum", "digest", "signature")


def read_header(buffer) -> tuple[dict[str, str], dict[str, TensorSpec], memoryview]:
    """Parse and validate the safetensors header at the start of ``buffer``.

    Returns ``(metadata, specs, data)``: string metadata, one `TensorSpec` per tensor (dtype
    known, shape of non-negative ints, offsets inside ``data``) and the bytes after the header.
    Only the header is read, so ``buffer`` may be the file's first bytes when ``data`` is unused.

    Raises:
        CorruptPacketError: truncated, not JSON, nested too deeply, or any entry of the wrong type.
    """
    header, data = _parse_safetensors(buffer)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptPacketError("packet metadata is not a map of strings; the file is corrupt")
    if meta.get("format") != FORMAT:
        raise CorruptPacketError(f"not a kvpacket/1 file (format={str(meta.get('format'))[:40]!r}); rebuild the packet")
    return meta, {name: _tensor_spec(name, info) for name, info in header.items()}, data


def read_sealed(buffer, verify: bool = True, signing_key: bytes | None = None
                ) -> tuple[dict[str, str], dict[str, TensorSpec], dict[str, memoryview]]:
    """`read_header`, the tensors' bytes, and the seal checked: the digest (and signature when keyed).

    Raises:
        CorruptPacketError: malformed header, tensor outside the file, or digest mismatch.
        UntrustedPacketError: ``signing_key`` given and the signature is missing or wrong.
    """
    meta, specs, data = read_header(buffer)
    chunks = {}
    for name, spec in specs.items():
        if spec.end > len(data):
            raise CorruptPacketError(f"packet tensor '{name}' points outside the file; the file is truncated")
        chunks[name] = data[spec.start : spec.end]
    if signing_key is not None:
        _check_signature(meta, specs, chunks, signing_key)
    elif verify:
        _check_digest(meta, specs, chunks)
    return meta, specs, chunks


def seal(tensors: dict[str, torch.Tensor], metadata: dict[str, str], signing_key: bytes | None = None) -> bytes:
    """safetensors bytes of ``tensors`` whose metadata carries a ``digest`` (xxh3-128 over metadata, tensor
    names, dtypes, shapes and bytes) and, with ``signing_key``, an HMAC-SHA256 ``signature`` of the same."""
    specs = {name: TensorSpec(_SAFETENSORS_NAMES[t.dtype], tuple(t.shape), 0, 0) for name, t in tensors.items()}
    chunks = {name: t.reshape(-1).view(torch.uint8).numpy() for name, t in tensors.items()}
    meta = {k: v for k, v in metadata.items() if k not in _SEALS}
    meta["digest"] = _feed(xxhash.xxh3_128(), meta, specs, chunks).hexdigest()
    if signing_key is not None:
        meta["signature"] = _feed(hmac.new(signing_key, digestmod=hashlib.sha256), meta, specs, chunks).hexdigest()
    return save(tensors, metadata=meta)


def _feed(hasher, meta: dict[str, str], specs: dict[str, TensorSpec], chunks: dict) -> object:
    """Feed the sealed content (metadata without seals, tensor names/dtypes/shapes, tensor bytes) to ``hasher``."""
    described = {"metadata": {k: v for k, v in meta.items() if k not in _SEALS},
                 "tensors": {name: [spec.dtype, list(spec.shape)] for name, spec in specs.items()}}
    hasher.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(chunks):
        hasher.update(len(chunks[name]).to_bytes(8, "little"))
        hasher.update(chunks[name])
    return hasher


def _check_digest(meta: dict[str, str], specs: dict[str, TensorSpec], chunks: dict[str, memoryview]) -> None:
    if "digest" in meta:
        found = _feed(xxhash.xxh3_128(), meta, specs, chunks).hexdigest()
        expected = meta["digest"]
    else:  # written before the header digest: the checksum covers tensor bytes only
        checksum = xxhash.xxh3_128()
        for name in sorted(chunks):
            checksum.update(chunks[name])
        found, expected = checksum.hexdigest(), meta.get("checksum")
    if found != expected:
        raise CorruptPacketError("packet checksum mismatch: its header or tensors were altered or truncated; "
                                 "delete and rebuild it")


def _check_signature(meta: dict[str, str], specs: dict[str, TensorSpec], chunks: dict[str, memoryview],
                     signing_key: bytes) -> None:
    signature = meta.get("signature")
    if signature is None:
        raise UntrustedPacketError("packet is not signed, but this store requires signed packets (a signing key is "
                                   "set); it was written without the key or planted. Delete it and rebuild it with "
                                   "the store's key")
    found = _feed(hmac.new(signing_key, digestmod=hashlib.sha256), meta, specs, chunks).hexdigest()
    if not hmac.compare_digest(found, signature):
        raise UntrustedPacketError("packet signature does not match this store's key: it was altered, planted or "
                                   "signed with another key. Delete it and rebuild it with the store's key")


def _tensor_spec(name: str, info) -> TensorSpec:
    if not isinstance(info, dict):
        raise CorruptPacketError(f"packet header entry {name[:40]!r} is not a tensor description; the file is corrupt")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CorruptPacketError(f"packet tensor {name[:40]!r} has an unknown dtype; the file is corrupt")
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)):
        raise CorruptPacketError(f"packet tensor {name[:40]!r} has a malformed shape; the file is corrupt")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CorruptPacketError(f"packet tensor {name[:40]!r} has malformed offsets; the file is corrupt")
    return TensorSpec(dtype, tuple(shape), offsets[0], offsets[1])


def int_field(meta: dict[str, str], name: str, limit: int = 1 << 31) -> int:
    """Metadata field ``name`` as an int in ``[0, limit)``; CorruptPacketError if absent or not one."""
    text = meta.get(name)
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 12 or int(text) >= limit:
        raise CorruptPacketError(f"packet metadata field {name!r} is missing or not a count ({str(text)[:20]!r}); "
                                 "rebuild the packet")
    return int(text)


def check_token_ids(token_ids: torch.Tensor) -> None:
    """CorruptPacketError unless ``token_ids`` is an int64 vector."""
    if token_ids.dtype != torch.int64 or token_ids.dim() != 1:
        raise CorruptPacketError(f"packet token_ids must be an int64 vector, got {token_ids.dtype} "
                                 f"{tuple(token_ids.shape)}; rebuild the packet")


def packet_fields(meta: dict[str, str]) -> tuple:
    """``(n_header, n_trailer, model, tokenizer, adapter fingerprints, quantization, extra)`` from checked metadata."""
    missing = [f for f in ("model_fingerprint", "tokenizer_fingerprint", "adapter_fingerprint") if f not in meta]
    if missing:
        raise CorruptPacketError(f"packet metadata lacks {', '.join(missing)}; rebuild the packet")
    try:
        extra = json.loads(meta.get("extra", "{}"))
    except (ValueError, RecursionError):
        extra = None
    if not isinstance(extra, dict):
        raise CorruptPacketError("packet metadata 'extra' is not a JSON object; rebuild the packet")
    return (int_field(meta, "n_header"), int_field(meta, "n_trailer"), meta["model_fingerprint"],
            meta["tokenizer_fingerprint"], meta["adapter_fingerprint"], "none", extra)


def _parse_safetensors(buffer) -> tuple[dict, memoryview]:
    view = memoryview(buffer).cast("B")
    if len(view) < 8:
        raise CorruptPacketError("packet file is truncated (no header)")
    (size,) = struct.unpack("<Q", view[:8])
    if size > len(view) - 8 or size > 1 << 24:
        raise CorruptPacketError("packet file is truncated or not a safetensors file")
    try:
        header = json.loads(bytes(view[8 : 8 + size]))
    except (ValueError, RecursionError):  # bad JSON or UTF-8, huge numbers, nesting past the parser's limit
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
