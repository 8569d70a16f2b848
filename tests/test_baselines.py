"""CacheBlend, EPIC and kv_packet_refresh: exact at their extremes, selective in between, FLOPs by hand."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag import baselines
from kvpacket_rag.baselines import CacheBlend, Epic, PacketRefresh, run_deferred
from kvpacket_rag.batchcache import BatchKV, forward_rows
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.evaluation.teacher import continuation_logprobs
from kvpacket_rag.flops import forward_flops, layer_flops, rotation_flops
from kvpacket_rag.kvcache import KVBuffer
from kvpacket_rag.methods import get_method
from kvpacket_rag.testing import make_lora_adapter, make_tiny_model

CHUNKS = ["Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler."]
QUESTION = "Who designed the Analytical Engine?"
CONTINUATION = [504, 1234, 77]  # arbitrary forced answer tokens


@pytest.fixture(scope="module")
def engine4(tokenizer) -> PacketEngine:
    """A 4-layer tiny Llama: layers 2-3 are where CacheBlend becomes selective."""
    return PacketEngine(make_tiny_model("llama", tokenizer, num_hidden_layers=4), adapter=None)


def logprobs(engine, method):
    return continuation_logprobs(engine, method, QUESTION, CHUNKS, CONTINUATION)


def prepared(engine, method):
    """The method's context with its deferred tokens recomputed: the cache the question reads."""
    context = get_method(method).prepare(engine, CHUNKS, KVBuffer(engine.model), 0)
    run_deferred(engine.model, context)
    return context


@pytest.mark.parametrize("spec", ["cacheblend:1.0", "epic:1000"])
def test_full_selection_equals_full_recompute(tiny_model, spec):
    engine = PacketEngine(tiny_model, adapter=None)
    torch.testing.assert_close(logprobs(engine, spec), logprobs(engine, "full_recompute"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("adapter", [None, "none+preamble"])
def test_refreshing_every_token_equals_full_recompute_and_none_the_first_exact_reading(tiny_model, adapter):
    """kv_packet_refresh: the first chunk exact, the later chunks' packets with their first K tokens recomputed."""
    engine = PacketEngine(tiny_model, adapter=adapter)
    torch.testing.assert_close(logprobs(engine, "kv_packet_refresh:1000"), logprobs(engine, "full_recompute"),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logprobs(engine, "kv_packet_refresh:0"), logprobs(engine, "kv_packet_first_exact"),
                               atol=0, rtol=0)


def test_refresh_recomputes_the_start_of_each_chunk_after_the_first(engine4):
    reading, refresh = prepared(engine4, "kv_packet_first_exact"), prepared(engine4, "kv_packet_refresh:3")
    offset = len(engine4.formatter.preamble_ids()) + len(engine4.chunk_ids(CHUNKS[0]))
    starts = []
    for chunk in CHUNKS[1:]:
        starts += range(offset, offset + 3)
        offset += len(engine4.chunk_ids(chunk))
    for layer in range(4):
        diff = (refresh.cache.layers[layer].keys[0] - reading.cache.layers[layer].keys[0])[:, : refresh.length]
        changed = torch.nonzero(diff.abs().amax(dim=(0, 2)) > 0).flatten().tolist()
        assert set(changed) <= set(starts)
    assert refresh.forwarded_tokens == 3 * (len(CHUNKS) - 1)
    assert refresh.packet_keys[0] == engine4.packet_key(CHUNKS[0], "exact")


def test_refresh_refuses_packets_with_soft_tokens(tiny_llama):
    engine = PacketEngine(tiny_llama, adapter=make_lora_adapter(tiny_llama, n_soft=2))
    with pytest.raises(ValueError, match="none\\+preamble"):
        prepared(engine, "kv_packet_refresh:4")


@pytest.mark.parametrize("spec", ["cacheblend:0", "epic:0"])
def test_empty_selection_equals_no_recompute(engine4, spec):
    torch.testing.assert_close(logprobs(engine4, spec), logprobs(engine4, "no_recompute"), atol=0, rtol=0)


def test_blocks_change_nothing(engine4, monkeypatch):
    """Recomputed rows run in blocks that see only the keys up to their last position: same result."""
    want = {spec: logprobs(engine4, spec) for spec in ("cacheblend:0.5", "epic:5", "epic:1000")}
    monkeypatch.setattr(baselines, "BLOCK_ROWS", 4)
    for spec, logits in want.items():
        torch.testing.assert_close(logprobs(engine4, spec), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want["epic:1000"], logprobs(engine4, "full_recompute"), atol=1e-4, rtol=1e-4)


def test_epic_chunk_length_is_enough(engine4):
    longest = max(len(engine4.chunk_ids(c)) for c in CHUNKS)
    torch.testing.assert_close(logprobs(engine4, f"epic:{longest}"), logprobs(engine4, "full_recompute"),
                               atol=1e-4, rtol=1e-4)


def test_cacheblend_layers(engine4):
    """Layers 0-1 are fully recomputed; above, only the selected rows change, the rest stay the bare packets'."""
    full, bare = prepared(engine4, "full_recompute"), prepared(engine4, "no_recompute")
    blend = prepared(engine4, "cacheblend:0.3")
    preamble, length = len(engine4.formatter.preamble_ids()), full.length
    n = length - preamble
    layers = lambda ctx, i: ctx.cache.layers[i].keys[0, :, :length]
    for i in (0, 1):
        torch.testing.assert_close(layers(blend, i), layers(full, i), atol=1e-5, rtol=1e-4)
    for i in (2, 3):
        changed = (layers(blend, i) - layers(bare, i)).abs().amax(dim=(0, 2)) > 0
        assert not changed[:preamble].any()
        assert int(changed.sum()) == round(0.3 * n)
    assert blend.forwarded_tokens == length  # layers 0-1 rerun the preamble too (unchanged K/V)
    rotation = rotation_flops(engine4.model.config, n)
    assert rotation < blend.context_flops < prepared(engine4, "cacheblend:1").context_flops


def test_epic_recomputes_each_chunk_start(engine4):
    bare, epic = prepared(engine4, "no_recompute"), prepared(engine4, "epic:3")
    preamble = len(engine4.formatter.preamble_ids())
    starts, offset = [], preamble
    for chunk in CHUNKS:
        starts += range(offset, offset + 3)
        offset += len(engine4.chunk_ids(chunk))
    for layer in range(4):
        diff = (epic.cache.layers[layer].keys[0] - bare.cache.layers[layer].keys[0])[:, : epic.length]
        changed = torch.nonzero(diff.abs().amax(dim=(0, 2)) > 0).flatten().tolist()
        assert set(changed) <= set(starts) and len(changed) >= 3 * len(CHUNKS) - 1
    assert epic.forwarded_tokens == 3 * len(CHUNKS) and epic.deferred_positions == starts


@pytest.mark.parametrize("spec", ["epic:3", "kv_packet_refresh:3", "epic:1000"])
def test_deferred_tokens_run_in_the_question_forward_as_in_a_forward_before_it(tiny_model, spec):
    """EPIC and kv_packet_refresh leave their tokens to the question's forward (the engine's scheduler packs them
    before the question, at their own positions): the question's logits and the row's keys/values equal those of
    a selective forward over the same tokens before the question."""
    engine = PacketEngine(tiny_model, adapter=None)
    suffix = engine.formatter.suffix_ids(QUESTION)
    batch = BatchKV(engine.model)
    context = get_method(spec).prepare(engine, CHUNKS, batch.row_buffer(0), len(suffix))
    assert context.deferred_ids and context.context_prefill_s == 0.0
    positions = context.deferred_positions + list(range(context.length, context.length + len(suffix)))
    folded = forward_rows(batch, 0, [context.length], [context.deferred_ids + suffix], [positions])[0]
    before = continuation_logprobs(engine, spec, QUESTION, CHUNKS, [])[0]
    torch.testing.assert_close(torch.log_softmax(folded.float(), dim=-1), before, atol=1e-4, rtol=1e-4)
    separate = prepared(engine, spec)
    for layer in range(engine.model.num_layers):
        torch.testing.assert_close(batch.keys[layer, 0, :, : context.length],
                                   separate.cache.layers[layer].keys[0, :, : context.length], atol=1e-5, rtol=1e-4)
    if spec == "epic:1000":
        assert (engine.answer(QUESTION, CHUNKS, method=spec).token_ids
                == engine.answer(QUESTION, CHUNKS, method="full_recompute").token_ids)


def test_running_deferred_tokens_twice_changes_nothing(engine4):
    context = prepared(engine4, "kv_packet_refresh:3")
    keys = [layer.keys.clone() for layer in context.cache.layers]
    run_deferred(engine4.model, context)
    for layer, before in zip(context.cache.layers, keys):
        torch.testing.assert_close(layer.keys, before, atol=0, rtol=0)


def test_layer_flops_hand_count(tiny_llama):
    """hidden 64, 4x16 query heads (q=64), 2x16 KV heads (kv=32), ffn 128: per token
    projections 2*64*(64+2*32) + 2*64*64 = 24576, MLP 2*3*64*128 = 49152; attention 4*64*(p+1)."""
    config = tiny_llama.config
    per_token = 24576 + 49152
    assert layer_flops(config, [3, 4, 5, 6]) == 4 * per_token + 4 * 64 * (4 + 5 + 6 + 7)  # 300544
    assert layer_flops(config, [4, 6]) == 2 * per_token + 4 * 64 * (5 + 7)  # 150528
    assert layer_flops(config, []) == 0
    assert rotation_flops(config, 4) == 3 * 2 * 32 * 4  # 3 per element, 2 layers, kv dim 32
    # every token at every layer is a plain forward without the LM head
    assert 2 * layer_flops(config, range(7, 12)) == forward_flops(config, 5, 7, logits_tokens=0)


def test_method_flops_add_up(engine4):
    config, n_layers = engine4.model.config, 4
    preamble = len(engine4.formatter.preamble_ids())
    lengths = [len(engine4.chunk_ids(c)) for c in CHUNKS]
    positions = range(preamble, preamble + sum(lengths))
    rotation = rotation_flops(config, sum(lengths))
    assert prepared(engine4, "epic:1000").context_flops == n_layers * layer_flops(config, positions) + rotation
    starts = [preamble + sum(lengths[:i]) for i in range(len(lengths))]
    first_two = [p for s in starts for p in (s, s + 1)]
    assert prepared(engine4, "epic:2").context_flops == n_layers * layer_flops(config, first_two) + rotation
    assert prepared(engine4, "cacheblend:0").context_flops == rotation
    everything = range(preamble + sum(lengths))  # layers 0-1: one causal prefill, preamble included
    assert prepared(engine4, "cacheblend:1").context_flops == (2 * layer_flops(config, everything)
                                                               + 2 * layer_flops(config, positions) + rotation)


def test_names_and_errors():
    assert get_method("cacheblend:0.15").name == "cacheblend:0.15"
    assert get_method("epic:32").name == "epic:32"
    assert get_method("kv_packet_refresh:4").name == "kv_packet_refresh:4"
    assert isinstance(get_method("cacheblend"), CacheBlend) and isinstance(get_method("epic"), Epic)
    assert isinstance(get_method("kv_packet_refresh"), PacketRefresh)
    for bad in ("cacheblend:1.5", "cacheblend:-0.1", "cacheblend:x", "epic:-1", "epic:1.5", "kv_packet_refresh:-1"):
        with pytest.raises(ValueError, match="cacheblend|epic|kv_packet_refresh"):
            get_method(bad)
