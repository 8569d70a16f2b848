"""Packet quantization: int8 and 4-bit keys/values with per-(layer, head, channel) scales.

A quantized packet file is an ordinary ``kvpacket/1`` safetensors file whose metadata says
``quantization = int8 | int4`` and whose ``dtype`` is the dtype the packet is restored to. Its
tensors are

- ``keys``, ``values``: uint8 codes ``[layers, kv_heads, T, head_dim]`` (int8), or two 4-bit codes
  per byte ``[layers, kv_heads, T, head_dim / 2]`` (int4; channel ``2i`` in the low nibble);
- ``key_scale``, ``key_zero``, ``value_scale``, ``value_zero``: float32 ``[layers, kv_heads, 1, head_dim]``;
- ``token_ids``: int64 ``[L]``,

sealed like plain packets: the ``digest`` covers the metadata (``head_dim`` included) and every tensor.

Each (layer, head, channel) is quantized asymmetrically over the packet's positions:
``code = round((x - zero) / scale)`` with ``zero = min``, ``scale = (max - min) / (2**bits - 1)``,
so ``|x - dequantize(code)| <= scale / 2`` before the final cast to the packet dtype.

Decoding (`KVPacket.from_bytes` / `KVPacket.load` hand quantized files to `dequantize_packet`)
returns a plain packet (``quantization == "none"``) in the recorded dtype; its ``key`` is the key of
the packet that was quantized. Dequantized tensors are new memory, not views of the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CorruptPacketError
from .packet import KVPacket, check_token_ids, int_field, packet_fields, seal

QUANTIZATIONS = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_quantization(name: str) -> str:
    """Return ``name`` if it is a known quantization (``none``, ``int8``, ``int4``), else raise ValueError."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}: choose one of {', '.join(QUANTIZATIONS)}")
    return name


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and per-channel affine parameters of one ``[layers, kv_heads, T, head_dim]`` tensor.

    Attributes:
        codes: uint8 ``[layers, kv_heads, T, head_dim]`` (8 bits) or ``[..., head_dim / 2]`` (4 bits, packed).
        scale, zero: float32 ``[layers, kv_heads, 1, head_dim]``; ``x ≈ code * scale + zero``.
        bits: 8 or 4.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The approximated tensor ``[layers, kv_heads, T, head_dim]`` in ``dtype``."""
        codes = self.codes
        if self.bits == 4:
            out = torch.empty(*codes.shape[:-1], codes.shape[-1] * 2, dtype=torch.float32)
            out[..., 0::2] = codes & 0x0F
            out[..., 1::2] = codes >> 4
        else:
            out = codes.to(torch.float32)
        out.mul_(self.scale).add_(self.zero)
        return out if dtype == torch.float32 else out.to(dtype)


def quantize(x: torch.Tensor, bits: int) -> QuantizedTensor:
    """Quantize ``x`` ``[layers, kv_heads, T, head_dim]`` per (layer, head, channel) over its positions.

    Raises:
        ValueError: ``bits`` not 8 or 4, or an odd ``head_dim`` for 4 bits.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if x.dim() != 4:
        raise ValueError(f"expected a [layers, kv_heads, T, head_dim] tensor, got shape {tuple(x.shape)}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even head_dim, got {x.shape[-1]}; use int8")
    x = x.detach().to("cpu", torch.float32)
    levels = (1 << bits) - 1
    if x.shape[2] == 0:
        zero = torch.zeros(*x.shape[:2], 1, x.shape[3])
        scale = torch.ones_like(zero)
    else:
        zero = x.amin(dim=2, keepdim=True)
        scale = (x.amax(dim=2, keepdim=True) - zero) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((x - zero) / scale).round_().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedTensor(codes.contiguous(), scale.contiguous(), zero.contiguous(), bits)


def encode_packet(packet: KVPacket, quantization: str = "none", signing_key: bytes | None = None) -> bytes:
    """``kvpacket/1`` bytes of ``packet``, quantized as asked (``none`` gives `KVPacket.to_bytes`).

    Args:
        signing_key: sign the file with this key (see `KVPacket.to_bytes`).

    Raises:
        ValueError: unknown quantization, or a packet that is already quantized.
    """
    check_quantization(quantization)
    if packet.quantization != "none":
        raise ValueError(f"packet {packet.key[:12]} is already {packet.quantization}; store the original packet")
    if quantization == "none":
        return packet.to_bytes(signing_key)
    bits = BITS[quantization]
    keys, values = quantize(packet.keys, bits), quantize(packet.values, bits)
    tensors = {"keys": keys.codes, "values": values.codes, "key_scale": keys.scale, "key_zero": keys.zero,
               "value_scale": values.scale, "value_zero": values.zero,
               "token_ids": packet.token_ids.to(torch.int64).contiguous().cpu()}
    metadata = {**packet.metadata(), "quantization": quantization, "head_dim": str(packet.keys.shape[-1])}
    return seal(tensors, metadata, signing_key)


_QUANTIZED_TENSORS = {"keys", "values", "key_scale", "key_zero", "value_scale", "value_zero", "token_ids"}


def dequantize_packet(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> KVPacket:
    """Restore a plain packet from the (digest-verified) tensors and metadata of a quantized file.

    Every tensor's dtype and shape is checked against the others before anything is computed.

    Raises:
        CorruptPacketError: missing or extra tensors, bad metadata, or shapes that do not fit together.
    """
    quantization = meta.get("quantization")
    if quantization not in BITS:
        raise CorruptPacketError(f"unknown packet quantization {str(quantization)[:20]!r}; rebuild the packet")
    if set(tensors) != _QUANTIZED_TENSORS:
        raise CorruptPacketError(f"quantized packet holds tensors {[n[:20] for n in sorted(tensors)][:8]}, expected "
                                 f"{sorted(_QUANTIZED_TENSORS)}; rebuild the packet")
    dtype = _NAMES.get(meta.get("dtype", ""))
    if dtype is None:
        raise CorruptPacketError(f"quantized packet restores to unknown dtype {str(meta.get('dtype'))[:20]!r}; "
                                 "rebuild the packet")
    check_token_ids(tensors["token_ids"])
    _check_quantized_shapes(tensors, meta, BITS[quantization])
    parts = {}
    for name, prefix in (("keys", "key"), ("values", "value")):
        quantized = QuantizedTensor(tensors[name], tensors[f"{prefix}_scale"], tensors[f"{prefix}_zero"],
                                    BITS[quantization])
        parts[name] = quantized.dequantize(dtype)
    return KVPacket(parts["keys"], parts["values"], tensors["token_ids"], *packet_fields(meta))


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


__all__ = ["QUANTIZATIONS", "QuantizedTensor", "check_quantization", "dequantize_packet", "encode_packet",
           "quantize", "reconstruction_error"]
