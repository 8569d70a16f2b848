"""kv_link: packets plus trailers recomputed at question time equal one forward under the linked block mask."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.kvcache import KVBuffer
from kvpacket_rag.methods import LinkMethod, get_method
from kvpacket_rag.reference import block_causal_mask, block_forward

CHUNKS = ["Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler."]
QUESTION = "Who designed the Analytical Engine?"


@torch.no_grad()
def link_path_logits(engine: PacketEngine, chunks, question: str) -> torch.Tensor:
    """Question logits ``[len(suffix), vocab]`` through the engine's kv_link preparation and a prefill."""
    suffix = engine.formatter.suffix_ids(question)
    context = LinkMethod().prepare(engine, chunks, KVBuffer(engine.model), reserve=len(suffix))
    positions = torch.arange(context.length, context.length + len(suffix))[None]
    return engine.model.model(input_ids=torch.tensor([suffix]), position_ids=positions, cache=context.cache,
                              use_cache=True, logits_to_keep=len(suffix)).logits[0]


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_link_path_equals_linked_block_mask_forward(tiny_model, prefix):
    engine = PacketEngine(tiny_model, adapter=PacketAdapter.initialize(tiny_model, 4, 6, seed=2, prefix=prefix))
    f = engine.formatter
    got = link_path_logits(engine, CHUNKS, QUESTION)
    want = block_forward(tiny_model, engine.adapter, f.preamble_ids(), [f.chunk_ids(c) for c in CHUNKS],
                         f.suffix_ids(QUESTION), linked=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    packet = block_forward(tiny_model, engine.adapter, f.preamble_ids(), [f.chunk_ids(c) for c in CHUNKS],
                           f.suffix_ids(QUESTION))
    assert (got - packet).abs().max() > 1e-3  # the links do change what the question sees


def test_linked_mask_lets_trailer_rows_see_the_context_before_them():
    mask = block_causal_mask([2, 3, 3], 2, torch.float32, global_rows=[(3, 5)], hidden=[(0, 1)])[0, 0] == 0
    assert mask[4, :5].tolist() == [False, True, True, True, True]  # trailer row: all before it but the hidden span
    assert mask[2, :].tolist() == [False, False, True] + [False] * 7  # a block row: its own block only
    assert mask[6, :].tolist() == [False] * 5 + [True, True] + [False] * 3
    assert mask[9, :].tolist() == [False] + [True] * 9  # tail


def test_engine_answers_with_kv_link_and_reuses_kv_packet_packets(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=PacketAdapter.initialize(tiny_llama, 4, 4, seed=3))
    generation = GenerationConfig(max_new_tokens=4)
    packet = engine.answer(QUESTION, CHUNKS, method="kv_packet", generation=generation)
    link = engine.answer(QUESTION, CHUNKS, method="kv_link", generation=generation)
    assert engine.counters == {"packets_built": 3, "packets_loaded": 3}
    assert link.method == "kv_link" and link.context_tokens == packet.context_tokens
    assert link.forwarded_tokens == link.question_tokens + 3 * 4  # the links of three packets, nothing else
    full = engine.answer(QUESTION, CHUNKS, method="full_recompute", generation=generation)
    assert packet.context_flops < link.context_flops < full.context_flops


def test_kv_link_needs_a_trailer(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=None)
    with pytest.raises(ValueError, match="kv_packet"):
        engine.answer(QUESTION, CHUNKS, method=get_method("kv_link"))
