"""Packet quantization math: int8 and 4-bit keys/values with per-(layer, head, channel) scales.

Each (layer, head, channel) of a ``[layers, kv_heads, T, head_dim]`` tensor is quantized
asymmetrically over the packet's positions: ``code = round((x - zero) / scale)`` with
``zero = min``, ``scale = (max - min) / (2**bits - 1)``, so ``|x - dequantize(code)| <= scale / 2``
before the final cast to the packet dtype. 4-bit codes are packed two per byte (channel ``2i`` in
the low nibble).

This module holds the tensor math only; the file layout of quantized packets is part of the
packet format (`kvpacket_rag.packet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}


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

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the dequantized tensor."""
        layers, heads, positions, width = self.codes.shape
        return layers, heads, positions, width * (8 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
                   work: torch.Tensor | None = None) -> torch.Tensor:
        """The approximated tensor ``[layers, kv_heads, T, head_dim]`` in ``dtype``.

        Computes ``float32(code) * scale + zero`` in float32, then casts once to ``dtype``; every
        path (new tensor, ``out``, ``work``) gives the same bits.

        Args:
            dtype: result dtype (ignored when ``out`` is given: the result takes ``out``'s dtype).
            out: write the result here (any strides, e.g. a slice of an assembly buffer) instead of
                a new tensor.
            work: a float32 scratch tensor with at least as many elements as the result, reused
                across calls so that decoding touches no fresh memory. When ``out`` is float32 it
                is used directly and ``work`` is not needed.

        Returns:
            ``out`` when given, else a new tensor.
        """
        shape = self.shape
        if out is not None and out.dtype == torch.float32:
            target = out
        elif work is not None:
            target = work.reshape(-1)[: _count(shape)].view(shape)
        else:
            target = torch.empty(shape, dtype=torch.float32, device=self.codes.device)
        if self.bits == 4:
            target[..., 0::2] = self.codes & 0x0F
            target[..., 1::2] = self.codes >> 4
        else:
            target.copy_(self.codes)
        target.mul_(self.scale).add_(self.zero)
        if out is not None:
            return out if target is out else out.copy_(target)
        return target if dtype == torch.float32 and work is None else target.to(dtype, copy=work is not None)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


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


__all__ = ["BITS", "QUANTIZATIONS", "QuantizedTensor", "check_quantization", "quantize"]
