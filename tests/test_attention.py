"""The packed grouped-query SDPA gives the stock SDPA's results."""

from __future__ import annotations

import torch

from kvpacket_rag import attention
from kvpacket_rag.reference import block_causal_mask


def test_packed_gqa_equals_stock_sdpa(tiny_model):
    model = tiny_model.model
    assert model.config._attn_implementation == attention.NAME
    ids = torch.arange(200, 240)[None]
    mask = block_causal_mask([10, 12], 18, torch.float32)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask).logits
        prefix = model(input_ids=ids[:, :30], use_cache=True)
        step = model(input_ids=ids[:, 30:], cache=prefix.cache, use_cache=True).logits
        model.set_attn_implementation("sdpa")
        try:
            stock = model(input_ids=ids, attention_mask=mask).logits
            prefix = model(input_ids=ids[:, :30], use_cache=True)
            stock_step = model(input_ids=ids[:, 30:], cache=prefix.cache, use_cache=True).logits
        finally:
            model.set_attn_implementation(attention.NAME)
    torch.testing.assert_close(packed, stock, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step, stock_step, atol=1e-5, rtol=1e-4)


def test_packed_mask_gives_the_boolean_masks_attention(tiny_model):
    layer = tiny_model.model.model.layers[0].self_attn
    groups = layer.num_key_value_groups
    heads, kv_heads, dim = tiny_model.model.config.num_attention_heads, tiny_model.num_kv_heads, tiny_model.head_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, 5, dim, generator=generator)
    key, value = (torch.randn(1, kv_heads, 9, dim, generator=generator) for _ in range(2))
    mask = torch.arange(9)[None, None, None, :] <= torch.tensor([2, 4, 5, 7, 8])[None, None, :, None]
    plain, _ = attention.packed_gqa_sdpa(layer, query, key, value, mask)
    packed = attention.packed_mask(mask, groups, torch.float32)
    assert packed.shape == (1, 1, groups * 5, 9) and packed.dtype == torch.float32
    converted = attention.packed_sdpa(query, key, value, packed)
    torch.testing.assert_close(converted, plain, atol=0, rtol=0)
