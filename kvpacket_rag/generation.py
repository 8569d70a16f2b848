"""Token-by-token decoding over a prepared cache, with streaming text and stop strings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode an answer.

    Attributes:
        max_new_tokens: upper bound on generated tokens (>= 1).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_p: nucleus sampling mass in (0, 1]; only used when sampling.
        seed: random seed for sampling (None: nondeterministic).
        stop: strings that end the answer (not included in it); EOS always stops.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        object.__setattr__(self, "stop", tuple(self.stop))


def choose_token(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> int:
    """Pick the next token from ``[vocab]`` logits: argmax, or temperature/top-p sampling."""
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStreamer:
    """Incremental detokenization: feed token ids, get the new text, stop at stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._cut(text)[0]

    def _cut(self, text: str) -> tuple[str, bool]:
        cuts = [text.find(s) for s in self.stop if s and s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final (held back while a stop string may be forming)."""
        self.ids.append(token_id)
        text, self.stopped = self._cut(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
        safe = len(text) if self.stopped else len(text) - self._pending_stop_prefix(text)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        text = self.text
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta

    def _pending_stop_prefix(self, text: str) -> int:
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest


def eos_ids(tokenizer, model_config) -> set[int]:
    """Token ids that end generation (tokenizer EOS and the model's generation-config EOS)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(model_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


def decode_tokens(model, cache, first_logits: torch.Tensor, position: int, config: GenerationConfig,
                  stop_ids: set[int]) -> Iterator[int]:
    """Yield generated token ids, feeding each back through ``model`` with ``cache``.

    Args:
        model: the causal LM.
        cache: the cache after the prompt; extended in place.
        first_logits: ``[vocab]`` logits of the last prompt token.
        position: position id of the first generated token.
        config: decoding settings.
        stop_ids: token ids that end generation (not yielded).
    """
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    logits = first_logits
    for step in range(config.max_new_tokens):
        token = choose_token(logits, config, generator)
        if token in stop_ids:
            return
        yield token
        if step + 1 == config.max_new_tokens:
            return
        ids = torch.tensor([[token]], device=model.device)
        positions = torch.tensor([[position + step]], device=model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True,
                           logits_to_keep=1).logits[0, -1]


def stream_text(tokens: Iterator[int], streamer: TextStreamer, start: float, clock: dict) -> Iterator[str]:
    """Turn generated token ids into text pieces, stopping at stop strings.

    Records ``clock["ttft_s"]`` (seconds from ``start``, a `time.perf_counter()` value) at the first token.
    """
    for token in tokens:
        clock.setdefault("ttft_s", time.perf_counter() - start)
        piece = streamer.push(token)
        if piece:
            yield piece
        if streamer.stopped:
            break
    tail = streamer.flush()
    if tail:
        yield tail
