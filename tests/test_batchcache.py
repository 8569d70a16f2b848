"""forward_rows: rows of different lengths advanced in one forward (decode steps and prefills mixed) get the
logits each gets alone."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag import batchcache
from kvpacket_rag.batchcache import BatchKV, forward_rows
from kvpacket_rag.errors import ContextTooLongError

CONTEXTS = [list(range(100, 137)), list(range(300, 311)), list(range(500, 581))]  # 37, 11 and 81 tokens
SUFFIXES = [[7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]


@torch.no_grad()
def plain_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full forwards over the growing sequence: the tokens and each step's logits."""
    ids, logits = list(prompt), []
    for _ in range(steps):
        last = model.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
        logits.append(last)
        ids.append(int(last.argmax()))
    return ids[len(prompt):], logits


def test_rows_advanced_together_equal_plain_decoding(tiny_model):
    """Three requests with different context lengths, the third joining after two decode steps: each row's
    logits at every step equal those of plain full-forward decoding of that request alone."""
    steps = 6
    batch = BatchKV(tiny_model)
    lengths, tokens, got = [], [], [[], [], []]

    def join(row: int) -> None:  # prefill the context, then the suffix (as the scheduler does)
        forward_rows(batch, row, [0], [CONTEXTS[row]])
        logits = forward_rows(batch, row, [len(CONTEXTS[row])], [SUFFIXES[row]])[0]
        lengths.append(len(CONTEXTS[row]) + len(SUFFIXES[row]))
        tokens.append(int(logits.argmax()))
        got[row].append(logits)

    def step() -> None:
        logits = forward_rows(batch, 0, lengths, [[t] for t in tokens])
        for row, row_logits in enumerate(logits):
            lengths[row] += 1
            tokens[row] = int(row_logits.argmax())
            got[row].append(row_logits)

    join(0)
    join(1)
    for _ in range(2):
        step()
    join(2)
    while len(got[2]) < steps:
        step()
    for row in range(3):
        want_tokens, want_logits = plain_greedy(tiny_model, CONTEXTS[row] + SUFFIXES[row], len(got[row]))
        assert [int(x.argmax()) for x in got[row]] == want_tokens
        torch.testing.assert_close(torch.stack(got[row]), torch.stack(want_logits), atol=2e-5, rtol=1e-4)


def test_a_row_alone_and_in_a_batch_get_the_same_logits(tiny_llama):
    alone, together = BatchKV(tiny_llama), BatchKV(tiny_llama)
    forward_rows(alone, 0, [0], [CONTEXTS[1]])
    want = forward_rows(alone, 0, [len(CONTEXTS[1])], [SUFFIXES[1]])[0]
    forward_rows(together, 0, [0, 0, 0], CONTEXTS)
    got = forward_rows(together, 0, [len(c) for c in CONTEXTS], SUFFIXES)[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_rows_and_prefilling_rows_in_one_forward_get_their_own_logits(tiny_model):
    """One forward mixing decode steps (one token) and question prefills (several tokens, different counts),
    rows interleaved: every row gets the logits it gets alone."""
    batch = BatchKV(tiny_model)
    contexts = [*CONTEXTS, CONTEXTS[0][:5]]
    forward_rows(batch, 0, [0] * 4, contexts)
    new = [[3], SUFFIXES[2], [4], SUFFIXES[0]]  # decode, prefill, decode, prefill
    got = forward_rows(batch, 0, [len(c) for c in contexts], new)
    for row, context in enumerate(contexts):
        alone = BatchKV(tiny_model)
        want = forward_rows(alone, 0, [0], [context + new[row]])[0]
        torch.testing.assert_close(got[row], want, atol=2e-5, rtol=1e-4)


def test_moving_a_row_keeps_its_cache(tiny_llama):
    batch = BatchKV(tiny_llama)
    forward_rows(batch, 0, [0, 0], CONTEXTS[:2])
    want = forward_rows(batch, 1, [len(CONTEXTS[1])], [SUFFIXES[1]])[0]
    batch.move_row(1, 0, len(CONTEXTS[1]) + len(SUFFIXES[1]))
    again = BatchKV(tiny_llama)
    forward_rows(again, 0, [0], [CONTEXTS[1] + SUFFIXES[1]])
    torch.testing.assert_close(forward_rows(batch, 0, [len(CONTEXTS[1]) + len(SUFFIXES[1])], [[5]]),
                               forward_rows(again, 0, [len(CONTEXTS[1]) + len(SUFFIXES[1])], [[5]]))
    assert want.shape == (tiny_llama.config.vocab_size,)


def test_a_row_buffer_grows_the_batch_keeping_other_rows_and_refuses_too_long(tiny_llama):
    batch = BatchKV(tiny_llama)
    forward_rows(batch, 0, [0], [CONTEXTS[0]])
    keys = batch.keys[:, 0, :, : len(CONTEXTS[0])].clone()
    buffer = batch.row_buffer(1)
    buffer.reserve(batch.columns + 500)
    assert batch.rows == 2 and buffer.capacity == batch.columns
    assert torch.equal(batch.keys[:, 0, :, : len(CONTEXTS[0])], keys)
    with pytest.raises(ContextTooLongError):
        buffer.reserve(tiny_llama.max_positions + 1)


def test_new_storage_is_zero_so_unused_columns_cannot_poison_attention(tiny_llama):
    """Unused columns get attention weight 0, and 0 * NaN is NaN: fresh storage must hold no garbage."""
    batch = BatchKV(tiny_llama)
    forward_rows(batch, 0, [0], [CONTEXTS[0]])
    batch.reserve(3, batch.columns * 4)
    assert not batch.keys[:, 1:].any() and not batch.values[:, :, :, len(CONTEXTS[0]):].any()


def test_tokens_inside_the_cache_overwrite_it_before_the_question(tiny_model):
    """A row prefilled with wrong last context tokens, then given the right ones at their positions before its
    suffix in one call (beside a decoding row): its logits are those of the right context and suffix."""
    context, suffix, wrong = CONTEXTS[2], SUFFIXES[2], 4
    batch = BatchKV(tiny_model)
    forward_rows(batch, 0, [0, 0], [CONTEXTS[0], context[:-wrong] + [1] * wrong])
    n = len(context)
    positions = [[len(CONTEXTS[0])], list(range(n - wrong, n + len(suffix)))]
    got = forward_rows(batch, 0, [len(CONTEXTS[0]), n], [[7], context[-wrong:] + suffix], positions)
    want_suffix = plain_greedy(tiny_model, context + suffix, 1)[1][0]
    want_decode = plain_greedy(tiny_model, CONTEXTS[0] + [7], 1)[1][0]
    torch.testing.assert_close(got[1], want_suffix, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[0], want_decode, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("segment_tokens", [1, 3, 100])
def test_scattered_tokens_attended_in_segments(tiny_model, monkeypatch, segment_tokens):
    """Tokens at scattered positions inside the cache (re-run with the tokens they held) and a suffix, in one call:
    however the row is split into attention segments, its logits are those of the context and suffix, and its cache
    holds what a plain prefill holds."""
    monkeypatch.setattr(batchcache, "SEGMENT_TOKENS", segment_tokens)
    context, suffix = CONTEXTS[2], SUFFIXES[2]
    scattered = [3, 4, 5, 20, 21, 50, 70, 71, 72, 73]
    reference = BatchKV(tiny_model)
    forward_rows(reference, 0, [0], [context])
    batch = BatchKV(tiny_model)
    forward_rows(batch, 0, [0], [context])
    n = len(context)
    got = forward_rows(batch, 0, [n], [[context[p] for p in scattered] + suffix],
                       [scattered + list(range(n, n + len(suffix)))])[0]
    torch.testing.assert_close(got, plain_greedy(tiny_model, context + suffix, 1)[1][0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(batch.keys[:, :, :, :n], reference.keys[:, :, :, :n], atol=1e-5, rtol=1e-4)
    segments = batchcache._segments(scattered + list(range(n, n + len(suffix))))
    assert [s.stop - s.start for s, _ in segments][: 2] == {1: [3, 2], 3: [3, 3], 100: [18]}[segment_tokens][: 2]
    assert segments[-1][1] == n + len(suffix)
    with pytest.raises(ValueError, match="one position per new token"):
        forward_rows(batch, 0, [n], [[1, 2]], [[n]])
    with pytest.raises(ValueError, match="ascend"):
        forward_rows(batch, 0, [n], [[1, 2]], [[n, n - 3]])
