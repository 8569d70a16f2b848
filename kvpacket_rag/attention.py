"""The attention every loaded model runs: a grouped-query SDPA that never materialises repeated key/value heads.

With a cached context of N tokens and a short question, transformers' stock SDPA path copies every
layer's keys and values ``num_key_value_groups`` times (``repeat_kv``) whenever a mask is passed.
Here the query heads that share a KV head are packed along the query axis instead, so attention
runs directly on the cached tensors. The result is identical; only the memory traffic changes.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "kvpacket_sdpa"


def packed_gqa_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA over ``query [B, H, q, D]`` and ``key/value [B, H_kv, N, D]`` (H = groups * H_kv).

    Falls back to transformers' SDPA when there is nothing to save (no GQA, a GPU, or a maskless
    causal prefill that SDPA handles with ``is_causal``). A ``kvpacket_rows`` keyword (a
    `kvpacket_rag.batchcache.RowsAttention`) marks the packed tokens of several cache rows: each row's
    tokens then attend to that row alone.
    """
    rows = kwargs.pop("kvpacket_rows", None)
    groups = getattr(module, "num_key_value_groups", 1)
    unsupported = kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    packs = groups > 1 and query.device.type == "cpu" and not unsupported
    if rows is not None:
        if packs:
            def grouped(q, k, v, mask, scale):
                return packed_sdpa(q, k, v, mask, dropout=dropout, scaling=scale)
            return rows.attend(query, key, value, scaling, grouped, lambda m: packed_mask(m, groups, query.dtype)), None

        def stock(q, k, v, mask, scale):
            return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scale, **kwargs)[0]
        return rows.attend(query, key, value, scaling, stock), None
    if not packs or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, _, q_len, _ = query.shape
    mask = attention_mask[:, :1].expand(batch, 1, q_len, key.shape[2]).repeat(1, 1, groups, 1)
    return packed_sdpa(query, key, value, mask, dropout=dropout, scaling=scaling), None


def packed_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """SDPA of ``query [B, H, q, D]`` over ``key/value [B, H_kv, N, D]`` with the query heads that share a KV head
    packed along the query axis; ``mask [B, 1, groups * q, N]`` is already packed (boolean or additive, e.g.
    `packed_mask`). Returns ``[B, q, H, D]``."""
    batch, heads, q_len, dim = query.shape
    packed = query.reshape(batch, key.shape[1], heads // key.shape[1] * q_len, dim)
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()


def packed_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask `packed_sdpa` attends with for a boolean ``mask [B, 1 or H, q, N]`` (True = attend): repeated
    for the ``groups`` query heads packed per KV head, as an additive ``[B, 1, groups * q, N]`` mask of ``dtype``
    (0 or -inf, what SDPA makes of a boolean mask). A forward that attends with one mask in every layer converts it
    once (`kvpacket_rag.batchcache.RowsAttention`) instead of once per layer.
    """
    mask = mask[:, :1]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return additive.repeat(1, 1, groups, 1)


AttentionInterface.register(NAME, packed_gqa_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)
