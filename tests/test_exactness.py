"""The central property: the packet path equals one forward under the block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.kvcache import KVBuffer, assemble
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.testing import packet_path_logits, reference_logits

CHUNKS = ["Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler."]
QUESTION = "Who designed the Analytical Engine?"


def test_packet_path_equals_block_mask_forward(tiny_model, tmp_path):
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = PacketAdapter.initialize(tiny_model, 8, 8, seed=1)
    got = packet_path_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION, tmp_path)
    want = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_bare_packets_equal_plain_concatenation(tiny_model):
    """With a 0+0 adapter the packet path is the block-masked concatenation of the plain chunks."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = PacketAdapter.empty(tiny_model)
    got = packet_path_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    want = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_one_chunk_equals_ordinary_prefix_cache(tiny_llama):
    """One bare chunk right after the preamble: the same as a plain causal forward of the whole prompt,
    except that the chunk does not see the preamble; with an empty preamble it is exactly a prefix cache."""
    model = tiny_llama
    formatter = PromptFormatter(model.tokenizer)
    adapter = PacketAdapter.empty(model)
    chunk_ids = formatter.chunk_ids(CHUNKS[0])
    suffix = formatter.suffix_ids(QUESTION)
    packet = PacketBuilder(model, adapter, formatter).build(chunk_ids)
    cache = assemble(KVBuffer(model), [(packet.keys, packet.values)], model.rope, reserve=len(suffix))
    with torch.no_grad():
        got = model.model(input_ids=torch.tensor([suffix]),
                          position_ids=torch.arange(len(chunk_ids), len(chunk_ids) + len(suffix))[None],
                          cache=cache, use_cache=True, logits_to_keep=len(suffix)).logits[0]
        want = model.model(input_ids=torch.tensor([chunk_ids + suffix]), logits_to_keep=len(suffix)).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_batched_build_equals_single_build(tiny_llama):
    formatter = PromptFormatter(tiny_llama.tokenizer)
    builder = PacketBuilder(tiny_llama, PacketAdapter.initialize(tiny_llama, 4, 4), formatter)
    batched = builder.build_many(CHUNKS)
    for chunk, packet in zip(CHUNKS, batched):
        alone = builder.build(chunk)
        assert packet.key == alone.key
        torch.testing.assert_close(packet.keys, alone.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packet.values, alone.values, atol=1e-5, rtol=1e-4)
