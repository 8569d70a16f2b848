"""Packet quantization: int8 and 4-bit keys/values with per-(layer, head, channel) scales.

A quantized packet file is an ordinary ``kvpacket/1`` safetensors file whose metadata says
``quantization = int8 | int4`` and whose ``dtype`` is the dtype the packet is restored to. Its
tensors are

- ``keys``, ``values``: uint8 codes ``[layers, kv_heads, T, head_dim]`` (int8), or two 4-bit codes
  per byte ``[layers, kv_heads, T, head_dim / 2]`` (int4; channel ``2i`` in the low nibble);
- ``key_scale``, ``key_zero``, ``value_scale``, ``value_zero``: float32 ``[layers, kv_heads, 1, head_dim]``;
- ``token_ids``: int64 ``[L]``,

and its xxh3-128 ``checksum`` covers every tensor (sorted by name), as for plain packets.

Each (layer, head, channel) is quantized asymmetrically over the packet's positions:
``code = round((x - zero) / scale)`` with ``zero = min``, ``scale = (max - min) / (2**bits - 1)``,
so ``|x - dequantize(code)| <= scale / 2`` before the final cast to the packet dtype.

Decoding (`KVPacket.from_bytes` / `KVPacket.load` hand quantized files to `dequantize_packet`)
returns a plain packet (``quantization == "none"``) in the recorded dtype; its ``key`` is the key of
the packet that was quantized. Dequantized tensors are new memory, not views of the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import xxhash
from safetensors.torch import save

from .errors import CorruptPacketError
from .packet import KVPacket

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


def encode_packet(packet: KVPacket, quantization: str = "none") -> bytes:
    """``kvpacket/1`` bytes of ``packet``, quantized as asked (``none`` gives `KVPacket.to_bytes`).

    Raises:
        ValueError: unknown quantization, or a packet that is already quantized.
    """
    check_quantization(quantization)
    if packet.quantization != "none":
        raise ValueError(f"packet {packet.key[:12]} is already {packet.quantization}; store the original packet")
    if quantization == "none":
        return packet.to_bytes()
    bits = BITS[quantization]
    keys, values = quantize(packet.keys, bits), quantize(packet.values, bits)
    tensors = {"keys": keys.codes, "values": values.codes, "key_scale": keys.scale, "key_zero": keys.zero,
               "value_scale": values.scale, "value_zero": values.zero,
               "token_ids": packet.token_ids.to(torch.int64).contiguous().cpu()}
    checksum = xxhash.xxh3_128()
    for name in sorted(tensors):
        checksum.update(tensors[name].reshape(-1).view(torch.uint8).numpy())
    metadata = {**packet.metadata(), "quantization": quantization, "head_dim": str(packet.keys.shape[-1]),
                "checksum": checksum.hexdigest()}
    return save(tensors, metadata=metadata)


def dequantize_packet(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> KVPacket:
    """Restore a plain packet from the (checksum-verified) tensors and metadata of a quantized file.

    Raises:
        CorruptPacketError: missing tensors or metadata, or shapes that do not fit together.
    """
    quantization = meta.get("quantization")
    if quantization not in BITS:
        raise CorruptPacketError(f"unknown packet quantization {quantization!r}; rebuild the packet")
    try:
        dtype = _NAMES[meta["dtype"]]
        parts = {}
        for name, prefix in (("keys", "key"), ("values", "value")):
            codes, scale, zero = tensors[name], tensors[f"{prefix}_scale"], tensors[f"{prefix}_zero"]
            if codes.dtype != torch.uint8 or scale.dtype != torch.float32 or zero.dtype != torch.float32:
                raise CorruptPacketError(f"quantized packet tensor '{name}' has the wrong dtype; rebuild the packet")
            quantized = QuantizedTensor(codes, scale, zero, BITS[quantization])
            parts[name] = quantized.dequantize(dtype)
        return KVPacket(parts["keys"], parts["values"], tensors["token_ids"], int(meta["n_header"]),
                        int(meta["n_trailer"]), meta["model_fingerprint"], meta["tokenizer_fingerprint"],
                        meta["adapter_fingerprint"], "none", json.loads(meta.get("extra", "{}")))
    except KeyError as error:
        raise CorruptPacketError(f"quantized packet lacks {error}; rebuild the packet") from None
    except RuntimeError as error:  # shapes of codes and scales do not broadcast
        raise CorruptPacketError(f"quantized packet tensors do not fit together ({error}); rebuild the packet") from None


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
