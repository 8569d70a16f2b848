"""The central property: the packet path equals one forward under the block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.kvcache import KVBuffer, PacketCache, assemble
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.reference import block_forward
from kvpacket_rag.store import InMemoryStore

CHUNKS = ["Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler."]
QUESTION = "Who designed the Analytical Engine?"


@torch.no_grad()
def packet_path_logits(model, adapter, formatter, chunks, question, tmp_path=None) -> torch.Tensor:
    """build each packet alone -> save/load -> rotate -> assemble -> prefill the question."""
    builder = PacketBuilder(model, adapter, formatter)
    packets = [builder.build(chunk) for chunk in chunks]
    if tmp_path is not None:
        packets = [KVPacket.load(p.save(tmp_path / f"{i}.kvp")) for i, p in enumerate(packets)]
    else:
        store = InMemoryStore()
        packets = [store.get(store.put(p)) for p in packets]
    preamble_ids = formatter.preamble_ids()
    preamble_cache = PacketCache(KVBuffer(model), 0)
    ids = torch.tensor([preamble_ids])
    model.model.model(input_ids=ids, position_ids=torch.arange(len(preamble_ids))[None], cache=preamble_cache, use_cache=True)
    preamble = preamble_cache.to_block()
    cache = assemble(KVBuffer(model), [preamble] + [(p.keys, p.values) for p in packets], model.rope, reserve=32)
    suffix = formatter.suffix_ids(question)
    start = cache.get_seq_length()
    out = model.model(input_ids=torch.tensor([suffix]), position_ids=torch.arange(start, start + len(suffix))[None],
                      cache=cache, use_cache=True, logits_to_keep=len(suffix))
    return out.logits[0]


def reference_logits(model, adapter, formatter, chunks, question) -> torch.Tensor:
    with torch.no_grad():
        return block_forward(model, adapter, formatter.preamble_ids(), [formatter.chunk_ids(c) for c in chunks],
                             formatter.suffix_ids(question))


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
