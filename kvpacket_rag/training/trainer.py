"""The distillation trainer: teach header/trailer soft tokens to make packets behave like full attention.

Teacher: the frozen model over the plain prompt (`training.teacher`). Student: the packet path itself,
differentiable (`training.student`: each wrapped chunk built alone, rotated and assembled after the preamble, then
``question | answer[:-1]`` read over it), equal to one forward under the block-diagonal mask
(`kvpacket_rag.reference.block_forward`), which the student becomes under gradient checkpointing. Loss:
KL(teacher ‖ student) per answer token, averaged over the answer tokens of an effective batch; with
``context_tokens``, plus ``context_weight`` times the KL per token of the last chunk's text read plainly after the
packets of the chunks before it; with ``kv_weight``, plus that weight times the relative squared error of the
packets' chunk keys and values against full recompute's in the sample's context. Only the adapter (soft tokens
and, when configured, its build-time low-rank updates) gets gradients.

Example:
    >>> from kvpacket_rag.training import TrainConfig, train
    >>> result = train(TrainConfig(out="adapter.safetensors", data="biography", samples=64, epochs=2))
    >>> result.final_loss, result.path
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import transformers
from tqdm.auto import tqdm

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.lora import BuildLoRA
from kvpacket_rag.models import LoadedModel, cache_dir, load_model
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.reference import block_forward

from .checkpoint import list_checkpoints, load_checkpoint, restore, save_checkpoint
from .config import SIGNATURE_DEFAULTS, TrainConfig, TrainingConfigError
from .data import TokenizedSample, load_training_samples, parse_data_spec, tokenize_sample
from .student import kv_match_error, packet_blocks, preamble_block, read_tail
from .teacher import TeacherCache, TeacherOutput


@dataclass
class TrainResult:
    """What a training session produced.

    Attributes:
        adapter: the trained (or, when ``finished`` is False, partly trained) adapter.
        path: the adapter file written (None when the session stopped early at ``stop_after_steps``).
        steps: optimizer steps done in total (all sessions).
        finished: whether all epochs are done.
        final_loss: mean per-token KL over the last epoch's steps (or the steps done, if fewer).
        wall_time_s: seconds over all sessions (teacher pass included).
        log: one dict per optimizer step (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``, ``tokens``, ``elapsed_s``).
    """

    adapter: PacketAdapter
    path: Path | None
    steps: int
    finished: bool
    final_loss: float
    wall_time_s: float
    log: list[dict] = field(default_factory=list)


def parameter_groups(adapter: PacketAdapter, lr: float, lora_lr: float) -> list[dict]:
    """AdamW groups: the soft tokens at peak ``lr``, the build LoRA (if any) at peak ``lora_lr``."""
    groups = [{"params": [adapter.header, adapter.trailer], "lr": lr, "peak_lr": lr}]
    if adapter.lora is not None:
        groups.append({"params": list(adapter.lora.parameters()), "lr": lora_lr, "peak_lr": lora_lr})
    return groups


def linear_lr(peak: float, step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear decay from ``peak`` to 0, no warm-up."""
    return peak * (1 - step / total)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of ``epoch``: a permutation that depends only on ``(n, seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class Trainer:
    """One training run: data, teacher pass, optimisation, checkpoints, logs and the adapter file.

    Args:
        config: the run's settings.
        model: an already loaded model (default: load ``config.model`` on ``config.device``/``config.dtype``).
    """

    def __init__(self, config: TrainConfig, model: LoadedModel | None = None):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        options = {name: config.loader_options(name) for name, _ in parse_data_spec(config.data)}
        self.raw_samples = load_training_samples(config.data, config.split, config.samples, config.seed, options,
                                                 config.max_chunks)  # before the model: bad data fails fast
        self.model = model if model is not None else load_model(config.model, config.device, config.dtype)
        self.formatter = PromptFormatter(self.model.tokenizer, config.system_prompt)
        self.preamble_ids = self.formatter.preamble_ids()
        self.samples: list[TokenizedSample] = []
        self.teacher: list[TeacherOutput] = []
        self.context_teacher: list[TeacherOutput | None] = []  # per sample; None where it has no context tail
        self.teacher_time_s = 0.0
        self.init_fingerprint: str | None = None
        self.preamble: tuple[torch.Tensor, torch.Tensor] | None = None  # the preamble's keys/values, set by prepare

    # ---- data and teacher ------------------------------------------------------------------

    def prepare(self) -> None:
        """Load and tokenize the samples, then run (or read from cache) the teacher on each."""
        c = self.config
        self.preamble = preamble_block(self.model, self.preamble_ids)
        adapter_tokens = c.n_header + c.n_trailer
        self.samples = [tokenize_sample(s, self.formatter, self.model, adapter_tokens, c.answer_cap)
                        for s in self.raw_samples]
        start = time.perf_counter()
        cache = TeacherCache(c.teacher_cache or cache_dir() / "teacher")
        stop = eos_ids(self.model.tokenizer, self.model.config)
        bar = tqdm(total=len(self.samples), desc="teacher", unit="sample", disable=not c.progress)
        hits = 0
        self.teacher = []
        for sample in self.samples:
            output, cached = cache.get_or_compute(self.model, sample.prompt_ids(self.preamble_ids), c.answer_cap,
                                                  stop, c.teacher_top_k, sample.id)
            hits += cached
            self.teacher.append(output)
            bar.set_postfix(cached=hits, refresh=False)
            bar.update(1)
        bar.close()
        self.context_teacher = [self._context_teacher(cache, sample) for sample in
                                tqdm(self.samples, desc="context teacher", unit="sample",
                                     disable=not (c.progress and c.context_tokens))]
        self.teacher_time_s = time.perf_counter() - start

    def _context_tail(self, sample: TokenizedSample) -> list[int] | None:
        """The text the context loss reads after the packets of ``sample``'s other chunks: the first
        ``context_tokens`` tokens of its last chunk; None when off or no packet would precede it."""
        c = self.config
        packets_before = len(sample.chunk_ids) - 1 - int(c.exact_first)
        tail = list(sample.chunk_ids[-1][: c.context_tokens])
        return tail if c.context_tokens and packets_before >= 1 and len(tail) >= 2 else None

    def _context_teacher(self, cache: TeacherCache, sample: TokenizedSample) -> TeacherOutput | None:
        tail = self._context_tail(sample)
        if tail is None:
            return None
        prompt = list(self.preamble_ids) + [t for ids in sample.chunk_ids[:-1] for t in ids] + tail
        return cache.get_or_compute_continuation(self.model, prompt, len(tail), self.config.teacher_top_k,
                                                 sample.id)[0]

    # ---- optimisation ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train (resuming when configured) and write the adapter; see `TrainResult`."""
        c = self.config
        session_start = time.perf_counter()
        checkpoints = list_checkpoints(c.run_dir)
        if checkpoints and not c.resume:
            raise TrainingConfigError(f"{c.run_dir} already holds checkpoints; pass resume=True (--resume) to continue "
                                      "that run, or choose another run directory")
        if not self.samples:
            self.prepare()
        adapter = self._initial_adapter().to(self.model.device)
        optimizer = torch.optim.AdamW(parameter_groups(adapter, c.lr, c.lora_lr), weight_decay=0.0)
        step, log, previous_s = 0, [], 0.0
        if checkpoints:
            step, log, previous_s = self._resume(load_checkpoint(checkpoints[-1]), adapter, optimizer)
        else:
            previous_s = self.teacher_time_s
        end = c.total_steps if c.stop_after_steps is None else min(c.total_steps, c.stop_after_steps)
        elapsed = lambda: previous_s + time.perf_counter() - session_start  # noqa: E731
        bar = tqdm(total=c.total_steps, initial=step, desc="train", unit="step", disable=not c.progress)
        with _gradient_checkpointing(self.model, c.gradient_checkpointing):
            for step, batch in self._batches(step, end):
                for group in optimizer.param_groups:
                    group["lr"] = linear_lr(group["peak_lr"], step, c.total_steps)
                lr = optimizer.param_groups[0]["lr"]
                loss, tokens, context_loss, kv_error = self._accumulate(adapter, batch)
                grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in adapter.parameters()
                                            if p.grad is not None))  # None: no path to the loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                log.append({"step": step + 1, "epoch": step // c.steps_per_epoch, "loss": loss, "lr": lr,
                            "grad_norm": grad_norm, "tokens": tokens, "elapsed_s": round(elapsed(), 2)})
                if c.context_tokens:
                    log[-1]["context_loss"] = context_loss
                if c.kv_weight:
                    log[-1]["kv_error"] = kv_error
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if c.checkpoint_every and (step + 1) % c.checkpoint_every == 0 and step + 1 < end:
                    self._checkpoint(step + 1, adapter, optimizer, log, elapsed())
        bar.close()
        steps_done = log[-1]["step"] if log else 0
        finished = steps_done >= c.total_steps
        self._checkpoint(steps_done, adapter, optimizer, log, elapsed())
        final = _final_loss(log, c.steps_per_epoch)
        path = None
        if finished:
            adapter.card = self._card(steps_done, final, log, elapsed())
            path = adapter.save(c.out)
        write_log(c.run_dir, c, log, {"teacher_time_s": self.teacher_time_s, "finished": finished})
        return TrainResult(adapter, path, steps_done, finished, final, elapsed(), log)

    def _initial_adapter(self) -> PacketAdapter:
        c = self.config
        if c.init_adapter is None:
            adapter = PacketAdapter.initialize(self.model, c.n_header, c.n_trailer, seed=c.seed, prefix=c.prefix)
            return adapter.with_lora(self._initial_lora(None))
        adapter = PacketAdapter.load(c.init_adapter, self.model)
        if adapter.calibration:
            raise TrainingConfigError(f"init_adapter {c.init_adapter} carries calibration contexts, which training "
                                      "does not read; start from the adapter it was calibrated from and calibrate "
                                      "the result with `kvpacket calibrate`")
        if adapter.n_header > c.n_header or adapter.n_trailer > c.n_trailer:
            raise TrainingConfigError(f"init_adapter {c.init_adapter} has {adapter.n_header}+{adapter.n_trailer} soft "
                                      f"tokens but the run asks for {c.n_header}+{c.n_trailer}; pass at least as many "
                                      "with --n-header/--n-trailer")
        self.init_fingerprint = adapter.fingerprint
        adapter = adapter.grown(self.model, c.n_header, c.n_trailer, seed=c.seed)
        return PacketAdapter(adapter.header, adapter.trailer, adapter.model_fingerprint, prefix=c.prefix,
                             lora=self._initial_lora(adapter.lora))  # no card

    def _initial_lora(self, start: BuildLoRA | None) -> BuildLoRA | None:
        """The run's build LoRA: ``start`` (with the run's targets it lacks added at B = 0) when its rank and scale
        match the run's, else a fresh one (B = 0)."""
        c = self.config
        if c.lora_rank == 0:
            return None
        if start is not None and (start.rank, start.alpha) == (c.lora_rank, float(c.lora_alpha)):
            return start.extended(self.model, c.lora_targets, seed=c.seed)
        return BuildLoRA.initialize(self.model, c.lora_rank, c.lora_alpha, c.lora_targets, seed=c.seed)

    def _batches(self, start_step: int, end_step: int) -> Iterator[tuple[int, list[int]]]:
        c = self.config
        for step in range(start_step, end_step):
            epoch, index = divmod(step, c.steps_per_epoch)
            order = epoch_order(len(self.samples), c.seed, epoch)
            yield step, order[index * c.batch_size:(index + 1) * c.batch_size]

    def _accumulate(self, adapter: PacketAdapter, batch: list[int]) -> tuple[float, int, float, float]:
        """Backward of the batch's loss (one sample at a time); returns (answer KL per token, answer tokens,
        context KL per context token, key/value error per sample)."""
        c = self.config
        tokens = sum(self.teacher[i].length for i in batch)
        context_tokens = sum(self.context_teacher[i].length for i in batch if self.context_teacher[i] is not None)
        total = context_total = kv_total = 0.0
        for i in batch:
            teacher, context = self.teacher[i], self.context_teacher[i]
            answer_logits, context_logits, kv_error = self._student_logits(adapter, self.samples[i], teacher, context)
            loss = teacher.kl(answer_logits).sum() / tokens
            total += float(loss.detach())
            if context is not None:
                context_loss = context.kl(context_logits).sum() / context_tokens
                context_total += float(context_loss.detach())
                loss = loss + c.context_weight * context_loss
            if kv_error is not None:
                kv_total += float(kv_error.detach()) / len(batch)
                loss = loss + c.kv_weight * kv_error / len(batch)
            loss.backward()
        return total, tokens, context_total, kv_total

    def _student_logits(self, adapter: PacketAdapter, sample: TokenizedSample, teacher: TeacherOutput,
                        context: TeacherOutput | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Student logits over the answer and, when ``context`` is given, over the context tail; and the packets'
        key/value error (`kv_match_error`; None when ``kv_weight`` is 0).

        The packet path builds the packets once for every term; under gradient checkpointing, which drops the KV
        cache that path reads, each read is one forward under the block mask (same logits and gradients).
        """
        c, model = self.config, self.model
        answer = teacher.answer_ids.to(model.device)
        tail = list(sample.suffix_ids) + answer[:-1].tolist()
        chunks = [list(ids) for ids in sample.chunk_ids]
        context_tail = chunks[-1][: context.length] if context is not None else None
        if c.gradient_checkpointing:
            answer_logits = block_forward(model, adapter, self.preamble_ids, chunks, tail, answer.numel(),
                                          exact_first=c.exact_first)
            context_logits = None if context is None else block_forward(
                model, adapter, self.preamble_ids, chunks[:-1], context_tail, context.length, exact_first=c.exact_first)
            return answer_logits, context_logits, None
        pieces = packet_blocks(model, adapter, self.preamble, chunks, c.exact_first)
        answer_logits = read_tail(model, pieces, tail, answer.numel())
        context_logits = None if context is None else read_tail(model, pieces[:-1], context_tail, context.length)
        kv_error = (kv_match_error(model, pieces, chunks, adapter.n_header, c.exact_first)
                    if c.kv_weight else None)
        return answer_logits, context_logits, kv_error

    def _resume(self, checkpoint, adapter, optimizer) -> tuple[int, list[dict], float]:
        c = self.config
        saved = {**SIGNATURE_DEFAULTS, **checkpoint.info["signature"]}
        mismatch = {k: (v, saved.get(k)) for k, v in c.resume_signature().items() if saved.get(k) != v}
        if checkpoint.info.get("model_fingerprint") != self.model.fingerprint:
            mismatch["model_fingerprint"] = (self.model.fingerprint[:12], str(checkpoint.info.get("model_fingerprint"))[:12])
        if mismatch:
            detail = "; ".join(f"{k}: now {now!r}, checkpoint {then!r}" for k, (now, then) in mismatch.items())
            raise TrainingConfigError(f"cannot resume from {c.run_dir}: settings differ ({detail}); use the original "
                                      "settings or another run directory")
        restore(checkpoint, adapter, optimizer)
        return checkpoint.step, list(checkpoint.info["log"]), float(checkpoint.info["elapsed_s"])

    def _checkpoint(self, step, adapter, optimizer, log, elapsed_s) -> None:
        info = {"signature": self.config.resume_signature(), "model_fingerprint": self.model.fingerprint,
                "elapsed_s": elapsed_s, "log": log}
        save_checkpoint(self.config.run_dir, step, adapter, optimizer, info)
        write_log(self.config.run_dir, self.config, log, {"teacher_time_s": self.teacher_time_s, "finished": False})

    def _card(self, steps: int, final_loss: float, log: list[dict], wall_s: float) -> dict:
        c = self.config
        settings = c.to_dict()
        keys = ("init_adapter", "data", "max_chunks", "samples", "split", "epochs", "batch_size", "lr", "lora_rank",
                "lora_alpha", "lora_lr", "lora_targets", "seed", "exact_first", "context_tokens", "context_weight",
                "kv_weight", "prefix", "answer_cap", "teacher_top_k", "system_prompt", "gradient_checkpointing", "device",
                "threads")
        answers = [t.length for t in self.teacher]
        return {
            "model": self.model.name, "dtype": str(self.model.dtype).removeprefix("torch."),
            "data_options": {name: c.loader_options(name) for name, _ in parse_data_spec(c.data)},
            **{k: settings[k] for k in keys},
            "optimizer": "AdamW(weight_decay=0), linear decay to 0, no warm-up",
            "loss": "KL(teacher || student) per answer token, full causal teacher, block-diagonal student"
                    + (f"; + {c.context_weight} x KL per token of the last chunk's first {c.context_tokens} tokens "
                       "read after the other chunks' packets" if c.context_tokens else "")
                    + (f"; + {c.kv_weight} x relative squared error of the packets' chunk keys/values against full "
                       "recompute's in context" if c.kv_weight else ""),
            "init_adapter_fingerprint": self.init_fingerprint,
            "steps": steps, "wall_time_s": round(wall_s, 1), "teacher_time_s": round(self.teacher_time_s, 1),
            "initial_loss": log[0]["loss"] if log else None, "final_loss": final_loss,
            "teacher_answer_tokens_mean": sum(answers) / max(1, len(answers)),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(sys.argv) if sys.argv else "",
        }


def train(config: TrainConfig, model: LoadedModel | None = None) -> TrainResult:
    """Run `Trainer` for ``config``: teacher pass, optimisation, adapter file (see `TrainResult`)."""
    trainer = Trainer(config, model)
    trainer.prepare()
    return trainer.run()


def _final_loss(log: list[dict], window: int) -> float:
    recent = [entry["loss"] for entry in log[-window:]]
    return sum(recent) / len(recent) if recent else float("nan")


@contextlib.contextmanager
def _gradient_checkpointing(model: LoadedModel, enabled: bool):
    """Recompute each decoder layer's activations in the backward pass while inside (model restored after)."""
    if not enabled:
        yield
        return
    hf = model.model
    modern = hasattr(hf, "activation_checkpointing_enable")  # transformers >= 5.x renamed the API
    kwargs = {"use_reentrant": False}
    if modern:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.train()  # transformers only checkpoints in training mode; these models have no dropout at inference
    try:
        yield
    finally:
        hf.activation_checkpointing_disable() if modern else hf.gradient_checkpointing_disable()
        hf.eval()


def write_log(run_dir: Path, config: TrainConfig, log: list[dict], extra: dict) -> None:
    """``log.json`` (settings and per-step records) and ``loss.png`` (loss curve) in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.json").write_text(json.dumps({"config": config.to_dict(), **extra, "steps": log}, indent=1) + "\n")
    if log:
        plot_loss(log, run_dir / "loss.png")


def plot_loss(log: list[dict], path: Path) -> Path:
    """Per-step loss and its moving average (a window of about a tenth of the steps) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in log]
    losses = [entry["loss"] for entry in log]
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, losses, alpha=0.35, label="step loss")
    axis.plot(steps, smooth, label=f"moving average ({window})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("KL(teacher ‖ student) per answer token")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
