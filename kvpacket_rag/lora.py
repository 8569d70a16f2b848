"""Build-time low-rank weights: the model that builds packets may differ from the model that reads them.

A packet is data: whatever keys and values make the frozen model answer as if it had read the chunks in
context are good packets. `BuildLoRA` holds low-rank updates ``W + (alpha / rank) * B @ A`` of the decoder's
linear layers that apply only while packets are built (to the wrapped chunk's tokens, never to the preamble,
the question or the answer). The model that prefills the question and decodes stays the unchanged base model,
so question time costs exactly what it costs without them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch

from .models import LoadedModel

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Attention projections of Llama-family decoder layers: the layers that write and read the packets' keys and
values."""

ALL_TARGETS = (*DEFAULT_TARGETS, "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama-family decoder layer that a build LoRA may update (attention, then MLP)."""

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")


def target_linears(model: LoadedModel, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The decoder's linear layers named in ``targets``, keyed ``layers.<i>.<block>.<name>`` (e.g.
    ``layers.0.self_attn.k_proj``), in layer order.

    Raises:
        ValueError: no linear layer of the model matches ``targets``.
    """
    found = {}
    for name, module in model.model.model.named_modules():
        match = _LAYER_NAME.match(name)
        if match and match.group(3) in targets and isinstance(module, torch.nn.Linear):
            found[name] = module
    if not found:
        raise ValueError(f"the model has no decoder linear layers named {', '.join(targets)}; pass targets among "
                         f"{', '.join(DEFAULT_TARGETS)}")
    return found


class BuildLoRA(torch.nn.Module):
    """Low-rank updates of the decoder's linear layers, active only while packets are built.

    Args:
        down: per layer name, float tensor ``A [rank, in_features]``.
        up: per layer name (the same names), float tensor ``B [out_features, rank]``.
        alpha: scale numerator; the update is ``(alpha / rank) * x @ A.T @ B.T``.

    Layer names are those of `target_linears` (dots are stored as ``/`` inside the module).
    """

    def __init__(self, down: dict[str, torch.Tensor], up: dict[str, torch.Tensor], alpha: float):
        super().__init__()
        if not down or down.keys() != up.keys():
            raise ValueError("a build LoRA needs the same non-empty set of layer names in its A and B tensors")
        ranks = {a.shape[0] for a in down.values()} | {b.shape[1] for b in up.values()}
        if len(ranks) != 1 or any(a.dim() != 2 for a in down.values()) or any(b.dim() != 2 for b in up.values()):
            raise ValueError("build LoRA tensors must be A [rank, in] and B [out, rank] with one rank")
        if not alpha > 0:
            raise ValueError(f"build LoRA alpha must be > 0, got {alpha}")
        self.rank, self.alpha = ranks.pop(), float(alpha)
        self.down = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(t.detach().clone().float()) for n, t in down.items()})
        self.up = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(t.detach().clone().float()) for n, t in up.items()})

    @classmethod
    def initialize(cls, model: LoadedModel, rank: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> "BuildLoRA":
        """New updates that change nothing yet: ``A`` drawn from N(0, 1/in), ``B = 0``."""
        if rank < 1:
            raise ValueError(f"build LoRA rank must be >= 1, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        down, up = {}, {}
        for name, linear in target_linears(model, targets).items():
            down[name] = torch.randn(rank, linear.in_features, generator=generator) / linear.in_features ** 0.5
            up[name] = torch.zeros(linear.out_features, rank)
        return cls(down, up, alpha)

    def extended(self, model: LoadedModel, targets: Sequence[str], seed: int = 0) -> "BuildLoRA":
        """A copy that also updates the ``targets`` layers it lacks, with the same rank and scale; the added
        layers start as `initialize` draws them (``B = 0``), so the copy changes packets exactly as this one."""
        down = {name: self.down[_key(name)].detach() for name in self.names}
        up = {name: self.up[_key(name)].detach() for name in self.names}
        fresh = BuildLoRA.initialize(model, self.rank, self.alpha, targets, seed)
        for name in fresh.names:
            if name not in down:
                down[name], up[name] = fresh.down[_key(name)].detach(), fresh.up[_key(name)].detach()
        return BuildLoRA(down, up, self.alpha)

    @property
    def targets(self) -> tuple[str, ...]:
        """The kinds of layer updated (e.g. ``("q_proj", "k_proj", "v_proj", "o_proj")``), in `ALL_TARGETS` order."""
        kinds = {name.rsplit(".", 1)[1] for name in self.names}
        return tuple(kind for kind in ALL_TARGETS if kind in kinds) + tuple(sorted(kinds - set(ALL_TARGETS)))

    @property
    def names(self) -> list[str]:
        return [_name(key) for key in self.down.keys()]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Float32 CPU tensors ``lora.<layer name>.A`` / ``.B`` for safetensors."""
        out = {}
        for key in self.down.keys():
            out[f"lora.{_name(key)}.A"] = self.down[key].detach().to("cpu", torch.float32).contiguous()
            out[f"lora.{_name(key)}.B"] = self.up[key].detach().to("cpu", torch.float32).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], alpha: float) -> "BuildLoRA | None":
        """The inverse of `tensors` (None when ``tensors`` holds no ``lora.*`` entries)."""
        down = {k[len("lora."):-len(".A")]: t for k, t in tensors.items() if k.startswith("lora.") and k.endswith(".A")}
        up = {k[len("lora."):-len(".B")]: t for k, t in tensors.items() if k.startswith("lora.") and k.endswith(".B")}
        return cls(down, up, alpha) if down or up else None

    def _linears(self, model: LoadedModel) -> dict[str, torch.nn.Linear]:
        """The model's linear layers of the kinds this LoRA updates (see `target_linears`)."""
        return target_linears(model, {name.rsplit(".", 1)[1] for name in self.names})

    def check_model(self, model: LoadedModel) -> None:
        """Raise ValueError unless every updated layer exists in ``model`` with matching shapes."""
        linears = self._linears(model)
        for key in self.down.keys():
            name = _name(key)
            linear = linears.get(name)
            if linear is None or self.down[key].shape[1] != linear.in_features or self.up[key].shape[0] != linear.out_features:
                raise ValueError(f"build LoRA layer {name} does not fit this model")

    @contextlib.contextmanager
    def applied(self, model: LoadedModel, gate: torch.Tensor | None = None) -> Iterator[None]:
        """Inside, the model's target layers compute ``W x + gate * (alpha / rank) * B A x``.

        Args:
            gate: ``[batch, tokens, 1]`` weights of the update per position (1 on packet tokens, 0 elsewhere),
                broadcast against each layer's output; None applies it to every position.
        """
        scale = self.alpha / self.rank
        linears = self._linears(model)
        handles = []
        for key in self.down.keys():
            down, up = self.down[key], self.up[key]

            def hook(_module, inputs, output, down=down, up=up):
                x = inputs[0]
                low = x @ down.to(x.dtype).T  # [..., rank]: gate and scale here, not on the wide output
                low = low * (scale if gate is None else gate.to(x.dtype) * scale)
                flat = torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), up.to(x.dtype).T)
                return flat.view_as(output)

            handles.append(linears[_name(key)].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _key(name: str) -> str:
    return name.replace(".", "/")


def _name(key: str) -> str:
    return key.replace("/", ".")
