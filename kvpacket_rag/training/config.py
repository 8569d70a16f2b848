"""`TrainConfig`: every setting of one adapter-training run, validated at construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpacket_rag.adapter import PREFIX_NONE, PREFIXES
from kvpacket_rag.errors import KVPacketError
from kvpacket_rag.lora import ALL_TARGETS, DEFAULT_TARGETS
from kvpacket_rag.prompt import DEFAULT_SYSTEM_PROMPT

DTYPES = ("float32", "bfloat16", "float16")

DEFAULT_DATA_OPTIONS: dict[str, dict[str, Any]] = {"biography": {"docs_per_sample": [2, 3, 5, 7]}}
"""Loader options used unless ``data_options`` names the dataset (biographies of 2, 3, 5 and 7 documents)."""

# Settings whose change makes a checkpoint of an earlier run invalid (the rest may change on --resume).
RESUME_KEYS = ("model", "data", "data_options", "max_chunks", "samples", "split", "epochs", "batch_size", "lr",
               "n_header", "n_trailer", "lora_rank", "lora_alpha", "lora_lr", "lora_targets", "prefix", "seed", "answer_cap", "teacher_top_k", "system_prompt", "dtype", "init_adapter", "exact_first",
               "context_tokens", "context_weight", "kv_weight")

SIGNATURE_DEFAULTS: dict[str, Any] = {"lora_targets": list(DEFAULT_TARGETS), "exact_first": False, "context_tokens": 0,
                                      "context_weight": 1.0, "kv_weight": 0.0}
"""Resume settings added after earlier checkpoints were written: the value such a checkpoint implies."""


class TrainingConfigError(KVPacketError, ValueError):
    """A training setting is out of range; the message names the setting and its valid values."""


@dataclass
class TrainConfig:
    """Settings of one distillation run (teacher: full attention; student: the packet path; KL on the answer).

    Attributes:
        out: path of the adapter file to write (``.safetensors``; its card goes next to it as ``.json``).
        model: Hugging Face id or directory; None for the embedded default SmolLM2-135M-Instruct.
        data: mixture spec ``NAME[:WEIGHT],...`` over ``biography``, ``hotpotqa``, ``niah``, ``squad`` and
            ``.jsonl`` files (``jsonl:PATH``), e.g. ``"biography:0.5,hotpotqa:0.5"``.
        data_options: loader options per dataset name, e.g. ``{"niah": {"n_chunks": 3}}``; datasets not named
            here use `DEFAULT_DATA_OPTIONS`.
        max_chunks: keep only the first this-many chunks of every sample (None: all). Distillation needs no
            gold answer, so truncated contexts remain valid training samples; they are cheaper.
        samples: number of training samples drawn from ``data`` (the teacher answers each once).
        split: dataset split to draw from (``train``; never train on the evaluation split).
        epochs: passes over the samples.
        batch_size: effective batch (samples per optimizer step, by gradient accumulation).
        lr: peak AdamW learning rate (weight decay 0), decayed linearly to 0 over all steps, no warm-up.
        n_header, n_trailer: adapter soft tokens before and after every chunk.
        lora_rank: rank of the build-time low-rank updates of the model's linear layers, applied to the wrapped
            chunk's tokens while packets are built (0: none; the model that reads packets is never changed).
        lora_alpha: scale numerator of those updates (``alpha / rank``).
        lora_lr: peak learning rate of the low-rank updates (the soft tokens use ``lr``).
        lora_targets: the kinds of linear layer they update, among `kvpacket_rag.lora.ALL_TARGETS` (default: the
            attention projections). A start adapter's updates are kept and the targets it lacks are added at zero.
        prefix: what every packet is built after: ``"preamble"`` (the chat preamble, the prompt's own prefix of
            every chunk) or ``"none"`` (position 0, as in the KV Packet paper).
        init_adapter: start from this adapter file (same model, at most ``n_header``/``n_trailer`` soft tokens:
            a smaller one is grown, its tokens kept next to the chunk) instead of a random initialisation, e.g. to
            continue training with more data, a new schedule or more soft tokens (None: draw from the embedding
            statistics).
        exact_first: train for the ``kv_packet_first_exact`` method: the student reads the first chunk of every
            sample plain after the preamble (exactly, as full recompute does) and the others as packets.
        context_tokens: also distil the text that follows the packets (0: the answer only). Every sample with at
            least one packet before its last chunk reads the first ``context_tokens`` tokens of that last chunk as
            plain text after the packets of the chunks before it; the loss adds KL(teacher ‖ student) per token
            of that text, the teacher being one full forward of ``preamble | chunks``. Packets are built once
            per sample and read by both tails.
        context_weight: weight of that per-token KL against the answer's.
        kv_weight: weight of a loss on the packets' keys and values themselves (0: off): the relative squared
            error of every packet's chunk keys/values against full recompute's in the sample's context
            (`kvpacket_rag.training.student.kv_match_error`). Needs ``gradient_checkpointing`` off.
        seed: adapter initialisation, sample draw and per-epoch shuffling.
        answer_cap: maximum tokens of the teacher's greedy answer.
        teacher_top_k: keep the teacher's top-k log-probabilities plus the rest mass (None: full vocabulary).
        system_prompt: system message of the preamble (the engine's default unless you serve another).
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30 % slower).
        device: ``cpu`` or ``cuda[:i]``.
        dtype: model dtype; None means float32 on CPU, bfloat16 on CUDA. The adapter stays float32.
        threads: torch CPU threads (None: torch's choice).
        checkpoint_every: optimizer steps between checkpoints (0: only at the end).
        run_dir: checkpoints, JSON log and loss-curve PNG (default: ``<out without suffix>.run``).
        teacher_cache: directory of cached teacher outputs (default: ``<kvpacket cache>/teacher``).
        stop_after_steps: end the session after this many optimizer steps in total (a checkpoint is written;
            continue later with ``resume``). The schedule still spans all epochs. None: run to the end.
        resume: continue from the latest checkpoint in ``run_dir`` (an error if the settings differ).
        progress: show tqdm progress bars.
    """

    out: Path
    model: str | None = None
    data: str = "biography:0.5,hotpotqa:0.5"
    data_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_chunks: int | None = None
    samples: int = 256
    split: str = "train"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 5e-3
    n_header: int = 8
    n_trailer: int = 8
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_lr: float = 1e-3
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    prefix: str = PREFIX_NONE
    init_adapter: Path | None = None
    exact_first: bool = False
    context_tokens: int = 0
    context_weight: float = 1.0
    kv_weight: float = 0.0
    seed: int = 0
    answer_cap: int = 64
    teacher_top_k: int | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    gradient_checkpointing: bool = False
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    checkpoint_every: int = 50
    run_dir: Path | None = None
    teacher_cache: Path | None = None
    stop_after_steps: int | None = None
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.suffix != ".safetensors":
            raise TrainingConfigError(f"out must end in .safetensors, got {self.out}")
        self.run_dir = Path(self.run_dir) if self.run_dir is not None else self.out.with_suffix(".run")
        self.teacher_cache = Path(self.teacher_cache) if self.teacher_cache is not None else None
        self.init_adapter = Path(self.init_adapter) if self.init_adapter is not None else None
        for name in ("samples", "epochs", "batch_size", "answer_cap"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("n_header", "n_trailer", "lora_rank", "checkpoint_every", "context_tokens"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        _require(self.n_header + self.n_trailer + self.lora_rank > 0, "n_header + n_trailer + lora_rank",
                 "at least 1 (there is nothing to train)")
        _require(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", "a float > 0")
        _require(isinstance(self.lora_lr, (int, float)) and 0 < self.lora_lr < 1, "lora_lr", "a float in (0, 1)")
        _require(self.context_tokens != 1, "context_tokens", "0 (off) or at least 2 (one token predicts the next)")
        _require(isinstance(self.context_weight, (int, float)) and self.context_weight > 0, "context_weight",
                 "a float > 0")
        _require(isinstance(self.kv_weight, (int, float)) and self.kv_weight >= 0, "kv_weight", "a float >= 0")
        _require(not (self.kv_weight and self.gradient_checkpointing), "kv_weight",
                 "0 with gradient_checkpointing (the key/value loss reads the packets that it drops)")
        self.lora_targets = tuple(self.lora_targets)
        _require(bool(self.lora_targets) and set(self.lora_targets) <= set(ALL_TARGETS)
                 and len(set(self.lora_targets)) == len(self.lora_targets), "lora_targets",
                 f"distinct names among {', '.join(ALL_TARGETS)}")
        for name in ("max_chunks", "teacher_top_k", "threads", "stop_after_steps"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, int) and value >= 1), name, "None or an integer >= 1")
        _require(self.prefix in PREFIXES, "prefix", f"one of {', '.join(PREFIXES)}")
        _require(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "lr", "a float in (0, 1)")
        _require(self.split in ("train", "test"), "split", "'train' or 'test'")
        _require(self.dtype is None or self.dtype in DTYPES, "dtype", f"None or one of {', '.join(DTYPES)}")
        _require(self.device == "cpu" or self.device.startswith("cuda"), "device", "'cpu' or 'cuda[:i]'")
        _require(isinstance(self.data, str) and self.data.strip() != "", "data", "a mixture spec such as "
                 "'biography:0.5,hotpotqa:0.5'")
        _require(isinstance(self.data_options, dict) and all(isinstance(v, dict) for v in self.data_options.values()),
                 "data_options", "a dict of dataset name -> dict of loader options")
        _require(bool(self.system_prompt.strip()), "system_prompt", "a non-empty string")

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last batch of an epoch may be smaller)."""
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def loader_options(self, name: str) -> dict[str, Any]:
        """Options passed to the loader of dataset ``name``."""
        return dict(self.data_options.get(name, DEFAULT_DATA_OPTIONS.get(name, {})))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (paths as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def resume_signature(self) -> dict[str, Any]:
        """The settings a checkpoint must share with this run to be resumed."""
        data = self.to_dict()
        return {key: data[key] for key in RESUME_KEYS}


def _require(ok: bool, name: str, valid: str) -> None:
    if not ok:
        raise TrainingConfigError(f"training setting {name} must be {valid}")
