"""Weight averaging of adapters trained from one starting point (a "soup" of training runs).

Adapters continued from the same adapter over different samples end near each other; their element-wise
mean often reads packets closer to full recompute than any one of them. Soft tokens are averaged as they
are; a build-time LoRA is averaged factor by factor (``A`` with ``A``, ``B`` with ``B``), which stays a
LoRA of the same rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapter import PacketAdapter
from ..lora import BuildLoRA


class AdapterAveragingError(ValueError):
    """The adapters cannot be averaged (different models, sizes, prefixes or low-rank layouts)."""


LAYOUT_FIELDS = ("model", "header size", "trailer size", "prefix", "build-time LoRA (rank, scale, layers)",
                 "calibration contexts")


def _layout(adapter: PacketAdapter) -> tuple:
    lora = adapter.lora
    lora_layout = None if lora is None else (lora.rank, lora.alpha, tuple(sorted(lora.names)))
    return (adapter.model_fingerprint, adapter.n_header, adapter.n_trailer, adapter.prefix, lora_layout,
            adapter.calibration)


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([tensor.detach().to("cpu", torch.float32) for tensor in tensors]).mean(dim=0)


def average_adapters(adapters: Sequence[PacketAdapter], card: dict | None = None) -> PacketAdapter:
    """The element-wise mean of ``adapters``.

    Args:
        adapters: two or more adapters of one model, with the same soft-token sizes, packet prefix and
            build-time LoRA layout (rank, scale and layers), or all without a LoRA.
        card: the averaged adapter's card (default: ``averaged_from``, the averaged adapters' fingerprints).

    Returns:
        A new float32 adapter; averaging one adapter with itself returns its values unchanged.

    Raises:
        AdapterAveragingError: fewer than two adapters, or adapters whose layouts differ.
    """
    if len(adapters) < 2:
        raise AdapterAveragingError(f"averaging needs at least two adapters, got {len(adapters)}")
    layouts = [_layout(adapter) for adapter in adapters]
    differing = [field for i, field in enumerate(LAYOUT_FIELDS) if len({layout[i] for layout in layouts}) > 1]
    if differing:
        raise AdapterAveragingError(
            "only adapters of one model with the same soft-token sizes, prefix, build-time LoRA layout and "
            "calibration contexts can be "
            f"averaged; these differ: {', '.join(differing)}")
    first = adapters[0]
    lora = None
    if first.lora is not None:
        factors = [adapter.lora.tensors() for adapter in adapters]
        lora = BuildLoRA.from_tensors({name: _mean([f[name] for f in factors]) for name in factors[0]},
                                      first.lora.alpha)
    if card is None:
        card = {"averaged_from": [adapter.fingerprint for adapter in adapters]}
    return PacketAdapter(_mean([a.header for a in adapters]), _mean([a.trailer for a in adapters]),
                         first.model_fingerprint, card, prefix=first.prefix, lora=lora, calibration=first.calibration)
