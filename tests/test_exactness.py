"""The central property: the packet path equals one forward under the block-diagonal mask."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.kvcache import KVBuffer, assemble
from kvpacket_rag.lora import ALL_TARGETS, DEFAULT_TARGETS, BuildLoRA
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.testing import make_lora_adapter, packet_path_logits, reference_logits

CHUNKS = ["Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler."]
QUESTION = "Who designed the Analytical Engine?"


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_packet_path_equals_block_mask_forward(tiny_model, tmp_path, prefix):
    """With ``prefix="preamble"`` the one forward holds, before each wrapped chunk, its own copy of the
    preamble, hidden from the question."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = PacketAdapter.initialize(tiny_model, 8, 8, seed=1, prefix=prefix)
    got = packet_path_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION, tmp_path)
    want = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix, targets", [("none", DEFAULT_TARGETS), ("preamble", DEFAULT_TARGETS),
                                             ("preamble", ALL_TARGETS)])
def test_build_lora_packet_path_equals_block_mask_forward(tiny_model, tmp_path, prefix, targets):
    """Packets built with build-time low-rank weights (of the attention projections, or of every linear layer),
    read by the unchanged model: the same logits as one forward in which the low-rank updates apply to the
    wrapped chunks' tokens only."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    lora = BuildLoRA.initialize(tiny_model, rank=4, targets=targets, seed=2)
    for up in lora.up.values():
        torch.nn.init.normal_(up, std=0.05)
    adapter = PacketAdapter.initialize(tiny_model, 4, 4, seed=1, prefix=prefix).with_lora(lora)
    got = packet_path_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION, tmp_path)
    want = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    plain = reference_logits(tiny_model, adapter.with_lora(None), formatter, CHUNKS, QUESTION)
    assert (got - plain).abs().max() > 1e-3  # the low-rank updates do change the packets


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


def test_first_preamble_prefixed_packet_is_the_plain_prompt(tiny_llama):
    """One packet built after the preamble, assembled right after it: exactly one plain causal forward
    of ``preamble | header | chunk | trailer | question``."""
    model = tiny_llama
    formatter = PromptFormatter(model.tokenizer)
    adapter = PacketAdapter.initialize(model, 3, 2, seed=3, prefix="preamble")
    got = packet_path_logits(model, adapter, formatter, CHUNKS[:1], QUESTION)
    preamble, suffix = formatter.preamble_ids(), formatter.suffix_ids(QUESTION)
    embed = lambda ids: model.embed(torch.tensor(ids))  # noqa: E731
    embeds = torch.cat([embed(preamble), adapter.wrap(embed(formatter.chunk_ids(CHUNKS[0]))), embed(suffix)])
    with torch.no_grad():
        want = model.model(inputs_embeds=embeds[None], logits_to_keep=len(suffix)).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_first_exact_packet_path_equals_block_mask_forward(tiny_model, tmp_path, prefix):
    """The first chunk read from its plain packet built after the preamble, the others from adapted packets with
    build-time low-rank updates: the same logits as one forward in which the first chunk shares the preamble's
    block."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = make_lora_adapter(tiny_model, seed=5, prefix=prefix)
    got = packet_path_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION, tmp_path, exact_first=True)
    want = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION, exact_first=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)).abs().max() > 1e-3


def test_first_exact_with_one_chunk_is_full_recompute(tiny_llama):
    """One chunk read exactly: one plain causal forward of ``preamble | chunk | question``."""
    formatter = PromptFormatter(tiny_llama.tokenizer)
    adapter = make_lora_adapter(tiny_llama, seed=6)
    got = packet_path_logits(tiny_llama, adapter, formatter, CHUNKS[:1], QUESTION, exact_first=True)
    suffix = formatter.suffix_ids(QUESTION)
    ids = formatter.preamble_ids() + formatter.chunk_ids(CHUNKS[0]) + suffix
    with torch.no_grad():
        want = tiny_llama.model(input_ids=torch.tensor([ids]), logits_to_keep=len(suffix)).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_batched_build_equals_single_build(tiny_model, prefix):
    formatter = PromptFormatter(tiny_model.tokenizer)
    builder = PacketBuilder(tiny_model, PacketAdapter.initialize(tiny_model, 4, 4, prefix=prefix), formatter)
    batched = builder.build_many(CHUNKS)
    for chunk, packet in zip(CHUNKS, batched):
        alone = builder.build(chunk)
        assert packet.key == alone.key
        torch.testing.assert_close(packet.keys, alone.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packet.values, alone.values, atol=1e-5, rtol=1e-4)


def test_packets_of_another_preamble_get_other_keys(tiny_llama):
    adapter = PacketAdapter.initialize(tiny_llama, 2, 2, prefix="preamble")
    one = PacketBuilder(tiny_llama, adapter, PromptFormatter(tiny_llama.tokenizer))
    other = PacketBuilder(tiny_llama, adapter, PromptFormatter(tiny_llama.tokenizer, "You answer in French."))
    unprefixed = PacketBuilder(tiny_llama, PacketAdapter(adapter.header, adapter.trailer, adapter.model_fingerprint),
                               PromptFormatter(tiny_llama.tokenizer))
    ids = one.chunk_ids(CHUNKS[0])
    assert len({one.key_for(ids), other.key_for(ids), unprefixed.key_for(ids)}) == 3


CONTEXTS = ["Marie Curie won two Nobel Prizes, in physics and in chemistry.",
            "Alan Turing described a universal machine in 1936 and later worked at Bletchley Park."]


@pytest.mark.parametrize("n_soft", [0, 4])
def test_calibrated_packet_path_equals_block_mask_forward(tiny_model, tmp_path, n_soft):
    """Packets built after ``preamble | calibration context`` (one context): the same logits as one forward in
    which each wrapped chunk has its own hidden copy of the preamble and the context before it."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = PacketAdapter.initialize(tiny_model, n_soft, n_soft, seed=1, prefix="preamble")
    calibrated = adapter.with_calibration([formatter.chunk_ids(CONTEXTS[1])])
    got = packet_path_logits(tiny_model, calibrated, formatter, CHUNKS, QUESTION, tmp_path)
    want = reference_logits(tiny_model, calibrated, formatter, CHUNKS, QUESTION)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    plain = reference_logits(tiny_model, adapter, formatter, CHUNKS, QUESTION)
    assert (got - plain).abs().max() > 1e-3  # the context does change the packets


def test_calibrated_packet_is_the_mean_over_its_contexts(tiny_model):
    """With several calibration contexts a packet holds the mean of the keys/values each context alone gives,
    built one chunk at a time or in a batch."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    contexts = [formatter.chunk_ids(text) for text in CONTEXTS]
    adapter = PacketAdapter.initialize(tiny_model, 2, 2, seed=3, prefix="preamble")
    both = PacketBuilder(tiny_model, adapter.with_calibration(contexts), formatter)
    alone = [PacketBuilder(tiny_model, adapter.with_calibration([ids]), formatter) for ids in contexts]
    for chunk, batched in zip(CHUNKS, both.build_many(CHUNKS)):
        packet, parts = both.build(chunk), [builder.build(chunk) for builder in alone]
        for got in (packet, batched):
            torch.testing.assert_close(got.keys, (parts[0].keys + parts[1].keys) / 2, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.values, (parts[0].values + parts[1].values) / 2, atol=1e-5, rtol=1e-4)
        assert len({packet.key, parts[0].key, parts[1].key}) == 3
    with pytest.raises(ValueError, match="no single forward"):
        reference_logits(tiny_model, adapter.with_calibration(contexts), formatter, CHUNKS, QUESTION)
