"""Analytic FLOP counts (multiply-add = 2 FLOPs) of the work done at question time."""

from __future__ import annotations

from typing import Iterable


def _dims(config) -> tuple[int, int, int, int, int, int]:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads * head_dim, kv_heads * head_dim, config.intermediate_size, config.num_hidden_layers, head_dim


def forward_flops(config, n_new: int, n_past: int = 0, logits_tokens: int = 1) -> int:
    """FLOPs of one causal forward of ``n_new`` tokens after ``n_past`` cached ones.

    Counts per layer the Q/K/V/O projections ``2*n*h*(q + 2kv) + 2*n*q*h``, the gated MLP
    ``2*n*3*h*ff``, attention scores and weighted values ``4*q*sum_i(n_past + i + 1)``, and the
    LM head for ``logits_tokens`` positions ``2*h*vocab`` each. Norms, RoPE and softmax are ignored.
    """
    if n_new <= 0:
        return 0
    hidden, q_dim, kv_dim, ffn, layers, _ = _dims(config)
    projections = 2 * n_new * hidden * (q_dim + 2 * kv_dim) + 2 * n_new * q_dim * hidden
    mlp = 2 * n_new * 3 * hidden * ffn
    attended = n_new * n_past + n_new * (n_new + 1) // 2
    attention = 4 * q_dim * attended
    return layers * (projections + mlp + attention) + 2 * hidden * config.vocab_size * logits_tokens


def rotation_flops(config, n_tokens: int) -> int:
    """FLOPs of re-rotating ``n_tokens`` cached keys: ``x*cos + rotate_half(x)*sin`` = 3 per element."""
    _, _, kv_dim, _, layers, _ = _dims(config)
    return 3 * layers * kv_dim * n_tokens


def layer_flops(config, positions: Iterable[int]) -> int:
    """FLOPs of one decoder layer over tokens at global ``positions`` attending to all earlier positions.

    Same terms as `forward_flops` (multiply-add = 2): projections
    ``2*h*(q + 2kv) + 2*q*h`` and gated MLP ``6*h*ff`` per token, attention ``4*q*(p + 1)`` per token at
    position ``p``. With ``positions = n_past .. n_past+n-1`` and every layer, it equals ``forward_flops``
    without the LM head.
    """
    hidden, q_dim, kv_dim, ffn, _, _ = _dims(config)
    positions = [int(p) for p in positions]
    per_token = 2 * hidden * (q_dim + 2 * kv_dim) + 2 * q_dim * hidden + 6 * hidden * ffn
    return len(positions) * per_token + 4 * q_dim * sum(p + 1 for p in positions)
