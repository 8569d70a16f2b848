"""Run context methods over samples and score them side by side.

For every sample, each method answers the question through `PacketEngine.answer` (the product path,
one clock for all methods; ``full_recompute``, the reference, first). Right after each answer, untimed,
the cache that answer was generated from is cropped back to its context and the full-recompute answer
is teacher-forced through it, giving KL(full || method) per token without preparing the context twice.
Packets are built before any timing (ingestion is offline) and dropped after the sample; the first
sample is answered once by every method as a warm-up before measuring.

Example:
    >>> engine = PacketEngine(adapter="default")
    >>> samples = load_samples("biography", "test", 20)
    >>> result = evaluate(engine, samples, EvalConfig(("kv_packet", "cacheblend:0.15")))
    >>> result["methods"]["kv_packet"]["f1"], result["methods"]["kv_packet"]["ttft_s"]
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..calibration import CalibrationConfig, NeighbourContexts
from ..datasets import Sample
from ..engine import Answer, PacketEngine
from ..generation import GenerationConfig
from ..context import ContextMethod
from ..methods import get_method
from ..metrics import answer_recall, best_f1, exact_match, macro_f1, micro_f1
from .teacher import forced_logprobs, kl_per_token

if TYPE_CHECKING:
    from ..embedder import Embedder

REFERENCE = "full_recompute"
ORDERS = ("dataset", "retrieval")
TIMINGS = ("packet_load_s", "assembly_s", "context_prefill_s", "question_prefill_s", "ttft_s", "total_s")


@dataclass(frozen=True)
class EvalConfig:
    """How to run an evaluation.

    Attributes:
        methods: method specs (``kv_packet``, ``cacheblend:0.15``, ``epic:32``, ...); ``full_recompute``,
            the reference of fidelity and KL, is run first whether listed or not. Names must be distinct.
        max_new_tokens: answer length cap (>= 1); decoding is greedy.
        warmup: answer the first sample once with every method before measuring.
        kl: compute the teacher-forced KL (one extra untimed context preparation per method and sample).
        progress: show a tqdm bar.
        calibration: with ``neighbours`` set, the engine's adapter packets are built after each chunk's own
            contexts drawn from its nearest passages among every evaluated question's passages (the served
            corpus; see `kvpacket_rag.calibration.NeighbourContexts`); None builds them as the adapter does.
        order: ``dataset`` reads each sample's chunks in the dataset's order; ``retrieval`` ranks them as a
            retriever would return them (`retrieval_order`: the default embedder's similarity to the question,
            most similar first). The reference and every method read the same order.
    """

    methods: tuple[str | ContextMethod, ...]
    max_new_tokens: int = 32
    warmup: bool = True
    kl: bool = True
    progress: bool = True
    calibration: CalibrationConfig | None = None
    order: str = "dataset"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        names = [get_method(spec).name for spec in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods repeat: {', '.join(self.methods)}; list each method once")
        if REFERENCE not in names:
            names.insert(0, REFERENCE)
            object.__setattr__(self, "methods", (REFERENCE, *self.methods))
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.calibration is not None and not self.calibration.neighbours:
            raise ValueError("an evaluation's calibration draws each chunk's contexts from its nearest passages: "
                             "set neighbours >= depth (shared contexts belong to the adapter: kvpacket calibrate)")

    @property
    def names(self) -> list[str]:
        """Canonical method names, in run order (the reference first)."""
        names = [get_method(spec).name for spec in self.methods]
        return [REFERENCE] + [n for n in names if n != REFERENCE]


def evaluate(engine: PacketEngine, samples: Sequence[Sample], config: EvalConfig,
             checkpoint: str | Path | None = None) -> dict:
    """Answer every sample with every method and score them.

    Args:
        engine: the engine (model, adapter, store); its store receives and then loses each sample's packets.
        samples: questions with chunks and gold answers (samples without answers score F1 0).
        config: methods and settings.
        checkpoint: a JSON Lines file that receives each sample's records as soon as they exist; when it
            already holds records of these samples and methods (an interrupted run, or a longer run of which
            ``samples`` are the first), those samples are not run again. The caller deletes it once the result
            is safely written.

    Returns:
        ``{"methods": {name: summary}, "resumed": k}`` where each summary is `summarize`'s dict with its
        per-sample ``records`` (prediction, scores, timings, FLOPs), in the order of ``config.names``, and
        ``k`` samples came from the checkpoint.

    Raises:
        ValueError: no samples, or a checkpoint of other samples or methods.
    """
    if not samples:
        raise ValueError("no samples to evaluate; pass n >= 1")
    embedder = None
    if config.order == "retrieval" or config.calibration is not None:  # one MiniLM for both
        from ..embedder import Embedder

        embedder = Embedder()
    if config.order == "retrieval":
        samples = retrieval_order(samples, embedder)
    generation = GenerationConfig(max_new_tokens=config.max_new_tokens)
    methods = {get_method(spec).name: spec for spec in config.methods}
    order = config.names
    done = _read_checkpoint(checkpoint, samples, order) if checkpoint is not None else []
    todo = samples[len(done):]
    if config.calibration is not None:
        engine.calibrate_on(_neighbour_contexts(engine, samples, config.calibration, embedder))
    try:
        _run_samples(engine, todo, done, order, methods, generation, config, checkpoint, len(samples))
    finally:
        if config.calibration is not None:
            engine.calibrate_on(None)
    summaries = {name: summarize([sample[name] for sample in done], engine) for name in order}
    add_relative(summaries)
    return {"methods": summaries, "resumed": len(samples) - len(todo)}


def retrieval_order(samples: Sequence[Sample], embedder: "Embedder") -> list[Sample]:
    """``samples`` with each one's chunks ranked as a retriever ranks them: by ``embedder``'s cosine similarity to
    the question, most similar first (equal scores keep the dataset's order). Ids, questions and answers unchanged."""
    ranked = []
    for sample in samples:
        scores = embedder.embed(sample.chunks) @ embedder.embed_query(sample.question)
        order = sorted(range(len(sample.chunks)), key=lambda i: -float(scores[i]))
        ranked.append(replace(sample, chunks=tuple(sample.chunks[i] for i in order)))
    return ranked


def _neighbour_contexts(engine: PacketEngine, samples: Sequence[Sample], calibration: CalibrationConfig,
                        embedder: "Embedder") -> NeighbourContexts:
    """Neighbour contexts over every passage of ``samples`` (``embedder`` ranks them)."""
    passages = [chunk for sample in samples for chunk in sample.chunks]
    return NeighbourContexts(passages, engine.formatter, embedder, calibration)


def _run_samples(engine: PacketEngine, todo: Sequence[Sample], done: list, order: list[str], methods: dict[str, str],
                 generation: GenerationConfig, config: EvalConfig, checkpoint: str | Path | None, total: int) -> None:
    """Answer ``todo`` (warm-up first), appending records to ``done`` and the checkpoint."""
    if config.warmup and todo:
        _run_sample(engine, todo[0], order, methods, generation, config.kl)
    for sample in tqdm(todo, desc="evaluating", unit="question", disable=not config.progress,
                       initial=len(done), total=total):
        done.append(_run_sample(engine, sample, order, methods, generation, config.kl))
        if checkpoint is not None:
            with open(checkpoint, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(done[-1], ensure_ascii=False) + "\n")


def _read_checkpoint(path: str | Path, samples: Sequence[Sample], order: list[str]) -> list[dict[str, dict]]:
    """Per-sample records already in ``path`` (one JSON object ``{method: record}`` per line)."""
    path = Path(path)
    if not path.is_file():
        return []
    done = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    done = done[: len(samples)]  # a longer run of the same questions: its first ones
    for sample, records in zip(samples, done):
        if list(records) != order or any(r["id"] != sample.id for r in records.values()):
            raise ValueError(f"{path} holds records of other questions or methods; delete it to start afresh")
    return done


def add_relative(summaries: dict[str, dict]) -> None:
    """Add ``f1_vs_full``, ``flops_vs_full`` and ``ttft_vs_full`` (ratios to full recompute) to each summary."""
    full = summaries[REFERENCE]
    for summary in summaries.values():
        summary["f1_vs_full"] = summary["f1"] / full["f1"] if summary["f1"] is not None and full["f1"] else None
        summary["flops_vs_full"] = summary["flops"] / full["flops"] if full["flops"] else None
        summary["ttft_vs_full"] = summary["ttft_s"] / full["ttft_s"] if full["ttft_s"] else None


class _Retaining(ContextMethod):
    """Delegates to a method and keeps the context it prepared, so the cache an answer was generated
    from can be scored afterwards (before the engine reuses its buffer for the next call)."""

    def __init__(self, method: ContextMethod):
        self.method, self.name, self.context = method, method.name, None

    def prepare(self, engine, chunks, buffer, reserve):
        self.context = self.method.prepare(engine, chunks, buffer, reserve)
        return self.context


def _run_sample(engine: PacketEngine, sample: Sample, order: list[str], methods: dict[str, str],
                generation: GenerationConfig, with_kl: bool) -> dict[str, dict]:
    """Answer with every method (the reference first); score each answer's own cache along the reference answer."""
    added = _build_packets(engine, sample.chunks, [get_method(methods[name]) for name in order])
    suffix = engine.formatter.suffix_ids(sample.question)
    answers, kls, reference_logprobs = {}, {}, None
    try:
        for name in order:
            method = _Retaining(get_method(methods[name]))
            answers[name] = _timed_answer(engine, sample, method, generation)
            if not with_kl:
                continue
            logprobs = forced_logprobs(engine, method.context, suffix, answers[REFERENCE][0].token_ids)
            if name == REFERENCE:
                reference_logprobs = logprobs
            kls[name] = (float(kl_per_token(reference_logprobs, logprobs).clamp_min(0).sum()), logprobs.shape[0])
    finally:
        for key in added:
            engine.store.delete(key)
    reference = answers[REFERENCE][0]
    return {name: _record(sample, answer, peak, reference, kls.get(name)) for name, (answer, peak) in answers.items()}


def _build_packets(engine: PacketEngine, chunks: Sequence[str], methods: Sequence[ContextMethod]) -> list[str]:
    """Build the packets of ``chunks`` that ``methods`` read; return the keys not stored before."""
    built: list[str] = []
    for method in methods:
        built += method.fetch_packets(engine, chunks).built_keys
    return built


def _timed_answer(engine: PacketEngine, sample: Sample, method: ContextMethod, generation: GenerationConfig):
    cuda = engine.model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.model.device)
        torch.cuda.reset_peak_memory_stats(engine.model.device)
    answer = engine.answer(sample.question, sample.chunks, method=method, generation=generation)
    peak = torch.cuda.max_memory_allocated(engine.model.device) / 2**20 if cuda else None
    return answer, peak


def _record(sample: Sample, answer: Answer, peak_mb: float | None, reference: Answer,
            kl: tuple[float, int] | None) -> dict:
    gold = list(sample.answers)
    return {
        "id": sample.id, "prediction": answer.text, "answers": gold,
        "prediction_sha": hashlib.sha256(answer.text.encode()).hexdigest()[:12],
        "f1": best_f1(answer.text, gold) if gold else 0.0, "em": exact_match(answer.text, gold) if gold else 0.0,
        "recall": answer_recall(answer.text, gold) if gold else 0.0,
        "fidelity": best_f1(answer.text, [reference.text]), "agreement": exact_match(answer.text, [reference.text]),
        "kl_sum": kl[0] if kl else None, "kl_tokens": kl[1] if kl else None,
        "generated_tokens": len(answer.token_ids), "timings": {k: round(v, 6) for k, v in answer.timings.items()},
        "context_flops": answer.context_flops, "prefill_flops": answer.prefill_flops,
        "context_tokens": answer.context_tokens, "question_tokens": answer.question_tokens,
        "forwarded_tokens": answer.forwarded_tokens, "peak_gpu_mb": peak_mb,
    }


def summarize(records: list[dict], engine: PacketEngine | None = None) -> dict:
    """Aggregate one method's per-sample records.

    Returns:
        ``f1`` (micro, the paper's metric), ``f1_macro``, ``em``, ``recall``, ``fidelity`` (mean F1 against the
        full-recompute answer), ``agreement`` (share of answers equal to it), ``kl`` (token-weighted mean nats,
        None when not computed), ``ttft_s`` (median) and ``ttft_breakdown`` (medians), ``flops`` (median
        context FLOPs at question time: rotation and recomputation, the question prefill excluded),
        ``prefill_flops`` (median, the question prefill included), ``context_tokens`` (median),
        ``kv_cache_mb`` (median assembled cache), ``peak_gpu_mb`` (max, CUDA only), ``n`` and ``records``.
    """
    scored = [r for r in records if r["answers"]]
    predictions, golds = [r["prediction"] for r in scored], [r["answers"] for r in scored]
    kl_tokens = sum(r["kl_tokens"] or 0 for r in records)
    peaks = [r["peak_gpu_mb"] for r in records if r["peak_gpu_mb"] is not None]
    context = _median([r["context_tokens"] for r in records])
    return {
        "n": len(records),
        "f1": micro_f1(predictions, golds) if scored else None,
        "f1_macro": macro_f1(predictions, golds) if scored else None,
        "em": _mean([r["em"] for r in scored]), "recall": _mean([r["recall"] for r in scored]),
        "fidelity": _mean([r["fidelity"] for r in records]), "agreement": _mean([r["agreement"] for r in records]),
        "kl": sum(r["kl_sum"] for r in records if r["kl_sum"] is not None) / kl_tokens if kl_tokens else None,
        "ttft_s": _median([r["timings"]["ttft_s"] for r in records]),
        "ttft_breakdown": {key: _median([r["timings"][key] for r in records]) for key in TIMINGS},
        "flops": _median([r["context_flops"] for r in records]),
        "prefill_flops": _median([r["prefill_flops"] for r in records]),
        "context_tokens": context,
        "kv_cache_mb": context * engine.model.kv_bytes_per_position / 2**20 if engine is not None else None,
        "peak_gpu_mb": max(peaks) if peaks else None,
        "records": records,
    }



def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
