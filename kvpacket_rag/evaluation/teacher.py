"""Teacher-forced scoring: how far a method's next-token distributions drift from full recompute.

Each method prepares its context exactly as it does when answering; then the question suffix and a
fixed continuation (the full-recompute answer) are forwarded in one pass, so every method is scored on
the same token sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..baselines import run_deferred
from ..engine import PacketEngine
from ..kvcache import KVBuffer
from ..context import ContextMethod, PreparedContext
from ..methods import get_method


@torch.no_grad()
def continuation_logprobs(engine: PacketEngine, method: str | ContextMethod, question: str, chunks: Sequence[str],
                          continuation: Sequence[int], buffer: KVBuffer | None = None) -> torch.Tensor:
    """Log-probabilities of the next token along ``continuation``, through ``method``'s prepared context.

    Args:
        engine: the engine (model, formatter, store).
        method: a method name (``full_recompute``, ``kv_packet``, ``cacheblend:0.15``, ...) or object.
        question: the question; the prompt suffix is rendered as the engine renders it.
        chunks: the context chunks, in order.
        continuation: ``m`` answer token ids fed after the question (teacher forcing).
        buffer: cache storage to reuse between calls (default: a fresh one).

    Returns:
        float32 ``[m + 1, vocab]``: row ``i`` is the distribution over token ``i`` of the answer given the
        tokens before it; the last row is the distribution after the whole continuation (where the
        teacher stopped or was cut off).
    """
    suffix = engine.formatter.suffix_ids(question)
    buffer = buffer if buffer is not None else KVBuffer(engine.model)
    context = get_method(method).prepare(engine, list(chunks), buffer, len(suffix) + len(continuation))
    return forced_logprobs(engine, context, suffix, continuation)


@torch.no_grad()
def forced_logprobs(engine: PacketEngine, context: PreparedContext, suffix: Sequence[int],
                    continuation: Sequence[int]) -> torch.Tensor:
    """Like `continuation_logprobs`, on an already prepared context.

    The context's cache is first cropped back to ``context.length`` (dropping any question/answer a
    previous call appended), so the cache an answer was generated from can be scored afterwards, and its
    deferred context tokens are recomputed (`run_deferred`).
    """
    extra = context.cache.get_seq_length() - context.length
    if extra > 0:
        context.cache.crop(-extra)
    run_deferred(engine.model, context)
    ids = list(suffix) + list(continuation)
    engine.model.check_context(context.length + len(ids), "context plus question and answer")
    device = engine.model.device
    positions = torch.arange(context.length, context.length + len(ids), device=device)[None]
    logits = engine.model.model(input_ids=torch.tensor([ids], device=device), position_ids=positions,
                                cache=context.cache, use_cache=True, logits_to_keep=len(continuation) + 1).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def kl_per_token(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``KL(reference || other)`` in nats for each row of two ``[m, vocab]`` log-probability tensors.

    Returns:
        float32 ``[m]``, each >= 0 (up to rounding).
    """
    if reference.shape != other.shape:
        raise ValueError(f"log-probability shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    return (reference.exp() * (reference - other)).sum(dim=-1)
