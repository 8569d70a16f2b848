"""The CUDA path (bf16/fp16): packets staged through pinned memory and assembled on the GPU.

Skipped without a GPU; run on a GPU machine when one is available.
"""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.kvcache import KVBuffer
from kvpacket_rag.methods import get_method
from kvpacket_rag.reference import block_forward

from kvpacket_rag.testing import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CHUNKS = ["Ada Lovelace was born in London.", "Alan Turing studied at Cambridge.", "Grace Hopper served in the navy."]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_packet_path_matches_block_mask_forward(tokenizer, dtype):
    model = make_tiny_model("qwen3", tokenizer, dtype=dtype)
    model.model.to("cuda")
    engine = PacketEngine(model, adapter=None)
    question = "Where was Ada born?"
    suffix = engine.formatter.suffix_ids(question)
    context = get_method("kv_packet").prepare(engine, CHUNKS, KVBuffer(model), reserve=len(suffix))
    positions = torch.arange(context.length, context.length + len(suffix), device="cuda")[None]
    with torch.no_grad():
        got = model.model(input_ids=torch.tensor([suffix], device="cuda"), position_ids=positions,
                          cache=context.cache, use_cache=True, logits_to_keep=len(suffix)).logits[0].float()
        want = block_forward(model, engine.adapter, engine.formatter.preamble_ids(),
                             [engine.chunk_ids(c) for c in CHUNKS], suffix).float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_cuda_generation_streams(tokenizer):
    model = make_tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    model.model.to("cuda")
    engine = PacketEngine(model, adapter=None)
    stream = engine.stream("Who served in the navy?", CHUNKS, generation=GenerationConfig(max_new_tokens=6))
    assert "".join(stream) == stream.answer.text
    assert stream.answer.forwarded_tokens == stream.answer.question_tokens
