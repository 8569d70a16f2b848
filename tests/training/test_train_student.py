"""The training student equals the packet inference path, and only the adapter learns."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.lora import BuildLoRA
from kvpacket_rag.kvcache import KVBuffer, PacketCache, assemble
from kvpacket_rag.packet import KVPacket
from kvpacket_rag.datasets import Sample
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.training import TeacherOutput, student_logits, teacher_answer, tokenize_sample
from kvpacket_rag.training.student import block_student_logits

CHUNKS = ("Ada Lovelace was born in London in 1815.",
          "The Analytical Engine was designed by Charles Babbage, a mathematician.",
          "Grace Hopper worked on the Harvard Mark I and wrote the first compiler.")
QUESTION = "Who designed the Analytical Engine?"


@torch.no_grad()
def packet_path_tail_logits(model, adapter, formatter, chunks, tail_ids, tmp_path, keep) -> torch.Tensor:
    """Engine path: build each packet alone -> save/load -> rotate/assemble after the preamble -> prefill the tail."""
    builder = PacketBuilder(model, adapter, formatter)
    packets = [KVPacket.load(builder.build(c).save(tmp_path / f"{i}.kvp")) for i, c in enumerate(chunks)]
    preamble_ids = formatter.preamble_ids()
    preamble_cache = PacketCache(KVBuffer(model), 0)
    model.model.model(input_ids=torch.tensor([preamble_ids]), position_ids=torch.arange(len(preamble_ids))[None],
                      cache=preamble_cache, use_cache=True)
    blocks = [preamble_cache.to_block()] + [(p.keys, p.values) for p in packets]
    cache = assemble(KVBuffer(model), blocks, model.rope, reserve=len(tail_ids))
    start = cache.get_seq_length()
    return model.model(input_ids=torch.tensor([tail_ids]), position_ids=torch.arange(start, start + len(tail_ids))[None],
                       cache=cache, use_cache=True, logits_to_keep=keep).logits[0]


def _sample(model, formatter):
    return tokenize_sample(Sample("t/0", CHUNKS, QUESTION), formatter, model, n_adapter_tokens=16, answer_cap=6)


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_student_logits_equal_packet_path_on_answer_positions(tiny_model, tmp_path, prefix):
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = PacketAdapter.initialize(tiny_model, 8, 8, seed=3, prefix=prefix)
    sample = _sample(tiny_model, formatter)
    teacher = teacher_answer(tiny_model, sample.prompt_ids(formatter.preamble_ids()), 6,
                             eos_ids(tiny_model.tokenizer, tiny_model.config))
    answer = teacher.answer_ids
    with torch.no_grad():
        got = student_logits(tiny_model, adapter, formatter.preamble_ids(), sample, answer)
    tail = list(sample.suffix_ids) + answer[:-1].tolist()
    want = packet_path_tail_logits(tiny_model, adapter, formatter, CHUNKS, tail, tmp_path, keep=answer.numel())
    assert got.shape == (answer.numel(), tiny_model.config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _lora_adapter(model, prefix: str) -> PacketAdapter:
    lora = BuildLoRA.initialize(model, rank=4, seed=2)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for up in lora.up.values():
            up.copy_(torch.randn(up.shape, generator=generator) * 0.05)
    return PacketAdapter.initialize(model, 4, 4, seed=1, prefix=prefix).with_lora(lora)


@pytest.mark.parametrize("prefix", ["none", "preamble"])
def test_student_with_build_lora_equals_packet_path(tiny_model, tmp_path, prefix):
    formatter = PromptFormatter(tiny_model.tokenizer)
    adapter = _lora_adapter(tiny_model, prefix)
    sample = _sample(tiny_model, formatter)
    answer = teacher_answer(tiny_model, sample.prompt_ids(formatter.preamble_ids()), 6, set()).answer_ids
    with torch.no_grad():
        got = student_logits(tiny_model, adapter, formatter.preamble_ids(), sample, answer)
    tail = list(sample.suffix_ids) + answer[:-1].tolist()
    want = packet_path_tail_logits(tiny_model, adapter, formatter, CHUNKS, tail, tmp_path, keep=answer.numel())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix, exact_first", [("none", False), ("preamble", False), ("preamble", True)])
def test_packet_student_and_block_mask_student_have_the_same_gradients(tiny_model, prefix, exact_first):
    """The per-chunk student (used in training) and the one-forward block-mask student (used under gradient
    checkpointing) are the same function of the adapter: equal logits and equal gradients of every parameter,
    also when the first chunk is read exactly (``kv_packet_first_exact``)."""
    formatter = PromptFormatter(tiny_model.tokenizer)
    sample = _sample(tiny_model, formatter)
    teacher = teacher_answer(tiny_model, sample.prompt_ids(formatter.preamble_ids()), 6, set())
    results = []
    for student in (student_logits, block_student_logits):
        adapter = _lora_adapter(tiny_model, prefix)
        logits = student(tiny_model, adapter, formatter.preamble_ids(), sample, teacher.answer_ids,
                         exact_first=exact_first)
        teacher.kl(logits).sum().backward()
        # None = no path to the loss (the last layer's query/output updates on chunk tokens): a zero gradient
        results.append((logits.detach(), {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for name, p in adapter.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, atol=2e-5, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 2  # soft tokens and low-rank updates
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-3, msg=name)


def test_teacher_equals_full_attention_forward(tiny_llama):
    """The teacher's step distributions are those of one causal forward over prompt + answer[:-1]."""
    formatter = PromptFormatter(tiny_llama.tokenizer)
    sample = _sample(tiny_llama, formatter)
    prompt = sample.prompt_ids(formatter.preamble_ids())
    teacher = teacher_answer(tiny_llama, prompt, 5, set())
    assert teacher.length == 5  # no stop ids: runs to the cap
    ids = prompt + teacher.answer_ids[:-1].tolist()
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([ids]), logits_to_keep=5).logits[0]
    torch.testing.assert_close(teacher.logprobs, torch.log_softmax(logits, -1), atol=1e-4, rtol=1e-4)
    assert torch.equal(teacher.answer_ids, logits.argmax(-1))


def test_gradients_reach_only_the_adapter(tiny_llama):
    formatter = PromptFormatter(tiny_llama.tokenizer)
    adapter = PacketAdapter.initialize(tiny_llama, 4, 4, seed=0)
    sample = _sample(tiny_llama, formatter)
    teacher = teacher_answer(tiny_llama, sample.prompt_ids(formatter.preamble_ids()), 4, set())
    teacher.kl(student_logits(tiny_llama, adapter, formatter.preamble_ids(), sample, teacher.answer_ids)).sum().backward()
    assert adapter.header.grad is not None and adapter.header.grad.abs().sum() > 0
    assert adapter.trailer.grad is not None and adapter.trailer.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_llama.model.parameters())


def test_kl_is_zero_for_the_teacher_and_top_k_lower_bounds_full():
    torch.manual_seed(0)
    teacher_logits, student = torch.randn(3, 50) * 3, torch.randn(3, 50) * 3
    logprobs = torch.log_softmax(teacher_logits, -1)
    answer = logprobs.argmax(-1)
    full = TeacherOutput(answer, logprobs=logprobs)
    assert full.kl(teacher_logits).abs().max() < 1e-5
    exact = torch.nn.functional.kl_div(torch.log_softmax(student, -1), logprobs, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(full.kl(student), exact, atol=1e-5, rtol=1e-5)
    from kvpacket_rag.training.teacher import _coarsen

    everything = TeacherOutput(answer, **_coarsen(logprobs, 50))
    torch.testing.assert_close(everything.kl(student), exact, atol=1e-4, rtol=1e-4)
    top5 = TeacherOutput(answer, **_coarsen(logprobs, 5))
    assert (top5.kl(student) <= exact + 1e-5).all() and (top5.kl(student) > 0).all()  # coarsening never adds KL


def test_kv_match_error_is_zero_where_a_packet_is_full_recompute_and_positive_elsewhere(tiny_model):
    from kvpacket_rag.training.student import kv_match_error, packet_blocks, preamble_block

    preamble_ids, chunks = [1, 2, 3], [[10, 11, 12, 13], [20, 21, 22]]
    preamble = preamble_block(tiny_model, preamble_ids)
    bare = PacketAdapter.initialize(tiny_model, 0, 0, prefix="preamble")
    one = packet_blocks(tiny_model, bare, preamble, chunks[:1])  # one bare packet after the preamble is exact
    assert kv_match_error(tiny_model, one, chunks[:1], 0).item() < 1e-10
    adapter = PacketAdapter.initialize(tiny_model, 2, 2, seed=1, prefix="preamble")
    for exact_first in (False, True):
        pieces = packet_blocks(tiny_model, adapter, preamble, chunks, exact_first)
        error = kv_match_error(tiny_model, pieces, chunks, 2, exact_first)
        assert error.requires_grad and error.item() > 1e-4
    exact = packet_blocks(tiny_model, bare, preamble, chunks[:1], exact_first=True)  # nothing left to compare
    assert float(kv_match_error(tiny_model, exact, chunks[:1], 0, exact_first=True)) == 0.0


def test_kv_match_error_compares_keys_at_the_same_positions(tiny_model):
    """The packet's keys, rotated back by its header's shift, against the reference at its plain positions."""
    from kvpacket_rag.training.student import _plain_after, _rotate, kv_match_error, packet_blocks, preamble_block

    preamble_ids, chunks = [1, 2, 3], [[10, 11, 12, 13], [20, 21, 22]]
    preamble = preamble_block(tiny_model, preamble_ids)
    adapter = PacketAdapter.initialize(tiny_model, 2, 2, seed=1, prefix="preamble")
    with torch.no_grad():
        pieces = packet_blocks(tiny_model, adapter, preamble, chunks, exact_first=True)
        got = kv_match_error(tiny_model, pieces, chunks, 2, exact_first=True)
        ref_k, ref_v = _plain_after(tiny_model, preamble, chunks[0] + chunks[1])
    keys, values = pieces[1][0][:, :, 2:5], pieces[1][1][:, :, 2:5]
    keys = _rotate(keys, -2, tiny_model)  # the header put the chunk two positions later than plain text
    want_k, want_v = ref_k[:, :, 7:10], ref_v[:, :, 7:10]
    relative = lambda a, b: ((a - b).pow(2).sum((1, 2, 3)) / b.pow(2).sum((1, 2, 3))).mean()  # noqa: E731
    torch.testing.assert_close(got, (relative(keys, want_k) + relative(values, want_v)) / 2, atol=1e-5, rtol=1e-4)
