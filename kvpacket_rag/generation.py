"""Token choice (greedy or sampled), streaming text with stop strings, and the token ids that end an answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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
