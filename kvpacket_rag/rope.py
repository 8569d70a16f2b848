"""RoPE re-rotation of cached keys.

Keys in a packet are stored *after* RoPE at local positions ``0..T-1``. RoPE is
relative: rotating a key computed at position ``p`` by the angle of ``delta``
gives exactly the key computed at ``p + delta``. That holds for every variant
whose angle is ``position * inv_freq`` with a fixed ``inv_freq``: default,
linear and llama3 scaling, and YaRN (whose extra attention scaling multiplies
the stored key once and must not be applied again by the delta rotation).
Variants whose frequencies depend on the sequence length (dynamic NTK,
LongRoPE) or that rotate only part of the head are refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """What the delta rotation needs to know about a model's RoPE.

    Attributes:
        rope_type: the variant name from the model config (`default`, `linear`, `llama3`, `yarn`).
        inv_freq: float32 tensor ``[head_dim // 2]`` of angular frequencies per position.
        attention_scaling: the factor the model multiplies cos/sin by (1.0 except YaRN).
        head_dim: size of one attention head; all of it is rotated.
    """

    rope_type: str
    inv_freq: torch.Tensor
    attention_scaling: float
    head_dim: int


def detect_rope(model: torch.nn.Module) -> RopeSpec:
    """Read the RoPE variant of a Hugging Face causal LM, refusing what cannot be re-rotated.

    Raises:
        UnsupportedModelError: no rotary embedding, a length-dependent variant, or partial rotary.
    """
    config = model.config
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no standard rotary embedding (model.model.rotary_emb); "
            "KV packets need RoPE attention (Llama, Qwen2, Qwen3, Mistral families)."
        )
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE variant '{rope_type}' changes its frequencies with the sequence length, so stored keys "
            f"cannot be moved by a fixed rotation. Supported variants: {', '.join(SUPPORTED_ROPE_TYPES)}. "
            "Load the model with a static rope_parameters setting instead."
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    inv_freq = rotary.original_inv_freq if hasattr(rotary, "original_inv_freq") else rotary.inv_freq
    if partial < 1.0 or inv_freq.numel() * 2 != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported; "
            "use a model that rotates the whole head."
        )
    return RopeSpec(
        rope_type=rope_type,
        inv_freq=inv_freq.detach().to("cpu", torch.float32).clone(),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
        head_dim=head_dim,
    )


def delta_cos_sin(spec: RopeSpec, delta: int, device: torch.device | str, dtype: torch.dtype):
    """cos/sin ``[head_dim]`` of the pure rotation by ``delta`` positions (no attention scaling).

    Angles are computed in float64 so that large deltas keep full precision.
    """
    angles = float(delta) * spec.inv_freq.to(torch.float64)
    angles = torch.cat([angles, angles])
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The RoPE half rotation ``[x1, x2] -> [-x2, x1]`` over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(
    keys: torch.Tensor, delta: int, spec: RopeSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Move post-RoPE keys ``delta`` positions later.

    Args:
        keys: ``[..., seq, head_dim]`` keys computed at some positions ``p``.
        delta: position offset (may be 0 or negative).
        spec: the model's RopeSpec.
        out: optional tensor of the same shape to write into (must not overlap ``keys``).

    Returns:
        Keys equal (to float rounding) to those computed at ``p + delta``; same shape and dtype.
        Computed half by half (``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]``) without temporaries.
    """
    if out is None:
        out = torch.empty_like(keys)
    if delta == 0:
        return out.copy_(keys)
    cos, sin = delta_cos_sin(spec, delta, keys.device, keys.dtype)
    half = keys.shape[-1] // 2
    cos, sin = cos[:half], sin[:half]
    x1, x2 = keys[..., :half], keys[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


def self_test(model: torch.nn.Module, spec: RopeSpec, tolerance: float = 1e-4) -> None:
    """Check numerically that ``rotate_keys`` matches the model's own RoPE at a shifted position.

    Uses the model's ``rotary_emb`` and its module's ``apply_rotary_pos_emb``.

    Raises:
        UnsupportedModelError: when the delta rotation does not reproduce the model's keys.
    """
    module = sys.modules[type(model.model).__module__]
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        raise UnsupportedModelError(
            f"{module.__name__} has no apply_rotary_pos_emb; cannot verify its RoPE. Use a Llama/Qwen/Mistral-family model."
        )
    generator = torch.Generator().manual_seed(0)
    device = spec.inv_freq.device
    keys = torch.randn(1, 2, 5, spec.head_dim, generator=generator)
    probe = torch.zeros(1, 5, spec.head_dim)
    positions = torch.arange(3, 8).unsqueeze(0)
    delta = 1000
    rotary = model.model.rotary_emb
    with torch.no_grad():
        rotary_device = rotary.inv_freq.device
        cos0, sin0 = rotary(probe.to(rotary_device), positions.to(rotary_device))
        cos1, sin1 = rotary(probe.to(rotary_device), (positions + delta).to(rotary_device))
        k0 = apply(keys, keys, cos0.float().cpu(), sin0.float().cpu())[1]
        k1 = apply(keys, keys, cos1.float().cpu(), sin1.float().cpu())[1]
    moved = rotate_keys(k0.to(device), delta, spec)
    error = (moved - k1).abs().max().item() / max(k1.abs().max().item(), 1e-12)
    if not error <= tolerance:
        raise UnsupportedModelError(
            f"RoPE self-test failed for {type(model).__name__} (rope_type={spec.rope_type}): re-rotated keys differ "
            f"from the model's by {error:.2e} (relative). Refusing to serve packets that would give wrong answers."
        )
