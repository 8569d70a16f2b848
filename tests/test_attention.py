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
