"""The teacher: the frozen model with full causal attention over the plain prompt, and its on-disk cache.

The teacher reads ``preamble | chunk_1 | ... | chunk_n | suffix`` (the token ids full recompute uses),
answers greedily up to a cap and keeps its log-probabilities at every generated step: over the whole
vocabulary, or the top-k plus the remaining mass. For the context loss it also gives its distributions over
the text of a chunk read after the chunks before it (`teacher_continuation`). Outputs are cached as safetensors
files named by a hash of the model, the prompt token ids and the teacher settings, so epochs and resumed runs
never regenerate them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvpacket_rag.fileio import atomic_write
from kvpacket_rag.models import LoadedModel

FORMAT = "kvpacket-teacher/1"
_MIN_LOGPROB = -1e4  # stands in for log(0) so that 0 * (log p - log q) stays 0


@dataclass
class TeacherOutput:
    """The teacher's greedy answer and its distributions at each answer step.

    Attributes:
        answer_ids: int64 ``[A]``, ``A >= 1``; the stop token is included when the teacher stopped before the cap.
        logprobs: float32 ``[A, vocab]`` log-probabilities (full-vocabulary mode), else None.
        top_ids: int64 ``[A, k]`` the k most likely tokens at each step (top-k mode), else None.
        top_logprobs: float32 ``[A, k]`` their log-probabilities (top-k mode), else None.
        rest_logprob: float32 ``[A]`` log of the remaining mass ``1 - sum(top-k)`` (top-k mode), else None.
    """

    answer_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    rest_logprob: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.answer_ids.dim() != 1 or self.answer_ids.numel() == 0:
            raise ValueError("answer_ids must be a non-empty 1-D tensor")
        full, top = self.logprobs is not None, self.top_ids is not None
        if full == top or (top and (self.top_logprobs is None or self.rest_logprob is None)):
            raise ValueError("give either logprobs, or top_ids with top_logprobs and rest_logprob")

    @property
    def length(self) -> int:
        return self.answer_ids.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("answer_ids", "logprobs", "top_ids", "top_logprobs", "rest_logprob")
        return {n: getattr(self, n).contiguous() for n in names if getattr(self, n) is not None}

    def kl(self, student_logits: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ student) per answer position, float32 ``[A]``, summed over the vocabulary.

        Args:
            student_logits: ``[A, vocab]`` logits predicting each answer token (any float dtype/device).
                In top-k mode the student is coarsened the same way (top-k tokens plus one "rest" bucket).
        """
        student = torch.log_softmax(student_logits.float(), dim=-1)
        device = student.device
        if self.logprobs is not None:
            teacher = self.logprobs.to(device)
            return (teacher.exp() * (teacher - student)).sum(-1)
        top_ids, teacher_top = self.top_ids.to(device), self.top_logprobs.to(device)
        student_top = student.gather(-1, top_ids)
        student_rest = student.scatter(-1, top_ids, float("-inf")).logsumexp(-1).clamp_min(_MIN_LOGPROB)
        teacher_rest = self.rest_logprob.to(device)
        return ((teacher_top.exp() * (teacher_top - student_top)).sum(-1)
                + teacher_rest.exp() * (teacher_rest - student_rest))


def _coarsen(logprobs: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
    """``[A, vocab]`` log-probabilities -> the stored tensors of full or top-k mode."""
    if top_k is None:
        return {"logprobs": logprobs}
    top_logprobs, top_ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
    rest = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1).clamp_min(_MIN_LOGPROB)
    return {"top_ids": top_ids, "top_logprobs": top_logprobs, "rest_logprob": rest}


@torch.no_grad()
def teacher_answer(model: LoadedModel, prompt_ids: Sequence[int], answer_cap: int, stop_ids: set[int],
                   top_k: int | None = None) -> TeacherOutput:
    """Greedy answer of the frozen model over ``prompt_ids`` (full causal attention), with its distributions.

    Args:
        prompt_ids: ``preamble | chunks | suffix`` token ids (see `TokenizedSample.prompt_ids`).
        answer_cap: at most this many answer tokens (the stop token included).
        stop_ids: token ids that end the answer (kept as its last token, so the student learns to stop).
        top_k: keep the top-k log-probabilities and the rest mass instead of the full vocabulary.
    """
    device = model.device
    out = model.model(input_ids=torch.tensor([list(prompt_ids)], device=device), use_cache=True, logits_to_keep=1)
    cache, logits = out.cache, out.logits[0, -1]
    tokens: list[int] = []
    steps: list[torch.Tensor] = []
    position = len(prompt_ids)
    while True:
        steps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        token = int(logits.argmax())
        tokens.append(token)
        if token in stop_ids or len(tokens) == answer_cap:
            break
        out = model.model(input_ids=torch.tensor([[token]], device=device),
                          position_ids=torch.tensor([[position]], device=device), cache=cache, use_cache=True)
        logits, position = out.logits[0, -1], position + 1
    return TeacherOutput(torch.tensor(tokens, dtype=torch.int64), **_coarsen(torch.stack(steps), top_k))


@torch.no_grad()
def teacher_continuation(model: LoadedModel, prompt_ids: Sequence[int], n_tokens: int,
                         top_k: int | None = None) -> TeacherOutput:
    """The frozen model's distributions over the last ``n_tokens - 1`` tokens of ``prompt_ids``, each given all the
    tokens before it (one forward with full causal attention): the teacher of text read after the context.

    Returns:
        A `TeacherOutput` whose ``answer_ids`` are those ``n_tokens - 1`` tokens (``n_tokens >= 2``).
    """
    if not 2 <= n_tokens <= len(prompt_ids):
        raise ValueError(f"n_tokens must be in [2, {len(prompt_ids)}], got {n_tokens}")
    logits = model.model(input_ids=torch.tensor([list(prompt_ids)], device=model.device),
                         logits_to_keep=n_tokens).logits[0, :-1]
    targets = torch.tensor(list(prompt_ids[len(prompt_ids) - n_tokens + 1:]), dtype=torch.int64)
    return TeacherOutput(targets, **_coarsen(torch.log_softmax(logits.float(), dim=-1).cpu(), top_k))


def teacher_key(model: LoadedModel, prompt_ids: Sequence[int], answer_cap: int, top_k: int | None,
                continuation: int | None = None) -> str:
    """Content key of one teacher output: model, dtype, prompt token ids and teacher settings (sha256 hex);
    ``continuation`` keys a `teacher_continuation` of that many tokens instead of a greedy answer."""
    fields = {"format": FORMAT, "model": model.fingerprint, "tokenizer": model.tokenizer_fingerprint,
              "dtype": str(model.dtype), "prompt": list(prompt_ids), "answer_cap": answer_cap, "top_k": top_k}
    if continuation is not None:
        fields["continuation"] = continuation
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


class TeacherCache:
    """A directory of teacher outputs, one safetensors file per key (atomic writes; unreadable files are
    treated as missing and regenerated).

    Args:
        directory: where the files live (created on first write).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key[:2]}" / f"{key}.safetensors"

    def get(self, key: str) -> TeacherOutput | None:
        """The cached output of ``key``, or None when absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return TeacherOutput(**load_file(str(path)))
        except (SafetensorError, OSError, ValueError, TypeError):
            return None

    def put(self, key: str, output: TeacherOutput, metadata: dict[str, str] | None = None) -> Path:
        """Store ``output`` under ``key``; return the file path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": FORMAT, **(metadata or {})}
        return atomic_write(path, lambda tmp: save_file(output.tensors(), str(tmp), metadata=metadata), durable=False)

    def get_or_compute(self, model: LoadedModel, prompt_ids: Sequence[int], answer_cap: int, stop_ids: set[int],
                       top_k: int | None = None, sample_id: str = "") -> tuple[TeacherOutput, bool]:
        """``(output, was_cached)`` for one prompt, computing and storing it when missing."""
        return self._get_or_compute(teacher_key(model, prompt_ids, answer_cap, top_k),
                                    lambda: teacher_answer(model, prompt_ids, answer_cap, stop_ids, top_k),
                                    {"sample_id": sample_id, "model": model.name})

    def get_or_compute_continuation(self, model: LoadedModel, prompt_ids: Sequence[int], n_tokens: int,
                                    top_k: int | None = None, sample_id: str = "") -> tuple[TeacherOutput, bool]:
        """``(output, was_cached)`` of `teacher_continuation`, computing and storing it when missing."""
        return self._get_or_compute(teacher_key(model, prompt_ids, 0, top_k, continuation=n_tokens),
                                    lambda: teacher_continuation(model, prompt_ids, n_tokens, top_k),
                                    {"sample_id": sample_id, "model": model.name, "kind": "continuation"})

    def _get_or_compute(self, key: str, compute: Callable[[], TeacherOutput],
                        metadata: dict[str, str]) -> tuple[TeacherOutput, bool]:
        cached = self.get(key)
        if cached is not None:
            return cached, True
        output = compute()
        self.put(key, output, metadata)
        return output, False
