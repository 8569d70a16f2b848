"""`kvpacket bench serve`: throughput and time to first token of one engine under concurrent questions.

The bundled demo corpus is ingested first (packets built and stored, not timed). Then, for each
``--concurrency`` level C, C client threads share one engine and ask ``--questions`` questions (the corpus's
suggested questions, cycled) through `PacketIndex.stream`: retrieval, packets, answer, as a RAG app would.
Each client asks its next question as soon as its previous answer is complete. Concurrent questions join the
engine's scheduler and are decoded together.

Per level: questions per second and generated tokens per second (over the wall time of the level), TTFT
percentiles (call start to first token, retrieval included), and the peak heap in use during the level
(glibc ``mallinfo2``, sampled every millisecond, minus the heap before it) divided by C: memory per active
request, batch KV storage and transients included. A breakdown of the TTFT separates retrieval, waiting for a
place in the batch and the forward that prefilled the question, and the first wave of a level (its C questions
arrive at once, so their prefills share one forward) from the questions that join a running batch. A reference
row runs plain Hugging Face ``generate`` on the same questions one after the other, over the same retrieved
chunks pasted into the prompt (full recompute), with the same token budget, on the first
``--reference-questions`` questions (it is slow). Each level is run ``--repeats`` times; the medians are
reported.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..generation import GenerationConfig
from ..tuning import set_threads, tune_malloc
from .common import engine_header, median, peak_rss_mb, write_outputs
from .ttft import HeapPeak

LEVELS = (1, 4, 8, 16)
METRICS = ("questions_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p95_s", "peak_mb_per_active_request")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS),
                        help="client threads asking at once, one level after the other (default: 1 4 8 16)")
    parser.add_argument("--questions", type=int, default=32, help="questions asked at every level")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer budget (greedy; EOS ends earlier)")
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--documents", type=int, default=None, help="index only the first N corpus documents")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every level (medians reported)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also time plain Hugging Face generate, sequentially, on the same questions")
    parser.add_argument("--reference-questions", type=int, default=8,
                        help="questions of the generate reference (the first N of those asked; default 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the result here (and a .md table beside it)")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linearly interpolated."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(records: list[dict], wall_s: float) -> dict:
    ttfts = [r["ttft_s"] for r in records]
    return {"questions_per_s": len(records) / wall_s, "tokens_per_s": sum(r["tokens"] for r in records) / wall_s,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95), "wall_s": wall_s,
            "mean_tokens": sum(r["tokens"] for r in records) / len(records)}


def ttft_breakdown(records: list[dict], concurrency: int) -> dict:
    """Where the time to first token goes: medians of retrieval, waiting for a place in the batch and the forward
    that prefilled the question, and the TTFT of the first wave (the ``concurrency`` questions asked at once when
    the level starts, whose prefills share one forward) against the questions asked after it."""
    first = [r["ttft_s"] for r in records if r["order"] < concurrency]
    later = [r["ttft_s"] for r in records if r["order"] >= concurrency]
    return {"retrieval_p50_s": percentile([r["retrieval_s"] for r in records], 0.5),
            "queue_p50_s": percentile([r["queue_s"] for r in records], 0.5),
            "prefill_forward_p50_s": percentile([r["question_prefill_s"] for r in records], 0.5),
            "first_wave_ttft_p50_s": percentile(first, 0.5),
            "later_ttft_p50_s": percentile(later, 0.5) if later else None,
            "later_ttft_p95_s": percentile(later, 0.95) if later else None}


def run_level(index, questions: list[str], concurrency: int, generation: GenerationConfig, top_k: int) -> dict:
    """Ask ``questions`` from ``concurrency`` client threads; throughput, TTFT and memory of the level."""
    engine = index.engine
    engine.release_buffers()  # the peak then counts the batch storage this level allocates
    pending = iter(enumerate(questions))
    take = threading.Lock()
    records: list[dict] = []
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with take:
                order, question = next(pending, (None, None))
            if question is None:
                return
            try:
                result = index.stream(question, top_k, generation=generation).collect()
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
                return
            timings = result.timings
            records.append({"order": order, "ttft_s": timings["ttft_s"], "tokens": len(result.answer.token_ids),
                            "retrieval_s": timings["retrieval_s"], "queue_s": timings["queue_s"],
                            "question_prefill_s": timings["question_prefill_s"]})

    before = engine.scheduler.stats()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    with HeapPeak() as heap:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    after = engine.scheduler.stats()
    out = summarize(records, wall)
    out.update(concurrency=concurrency, questions=len(questions), ttft_breakdown=ttft_breakdown(records, concurrency),
               peak_mb_per_active_request=(heap.peak - heap.start) / 2**20 / concurrency,
               max_batch=after["max_batch"], forwards=after["steps"] - before["steps"],
               loop_prepare_s=after["prepare_s"] - before["prepare_s"],
               loop_forward_s=after["forward_s"] - before["forward_s"],
               batch_storage_mb=after["batch_bytes"] / 2**20)
    return out


class _FirstToken:
    """A `generate` streamer that records when the first generated token arrives."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


@torch.no_grad()
def run_reference(index, questions: list[str], generation: GenerationConfig, top_k: int) -> dict:
    """Plain Hugging Face ``generate``, one question after the other, the retrieved chunks pasted in the prompt."""
    engine = index.engine
    model, formatter = engine.model, engine.formatter
    records = []
    with HeapPeak() as heap:
        start = time.perf_counter()
        for question in questions:
            began = time.perf_counter()
            chunks = [hit.text for hit in index.search(question, top_k)]
            ids = torch.tensor([formatter.full_prompt_ids(chunks, question)], device=model.device)
            streamer = _FirstToken()
            out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, streamer=streamer,
                                       max_new_tokens=generation.max_new_tokens,
                                       pad_token_id=model.tokenizer.eos_token_id)
            records.append({"ttft_s": (streamer.first or time.perf_counter()) - began,
                            "tokens": out.shape[1] - ids.shape[1]})
        wall = time.perf_counter() - start
    out = summarize(records, wall)
    out.update(concurrency=1, questions=len(questions), peak_mb_per_active_request=(heap.peak - heap.start) / 2**20)
    return out


def repeated(measure, repeats: int) -> dict:
    """Median of each metric over ``repeats`` runs of ``measure()``; the runs themselves under ``repeats``."""
    runs = [measure() for _ in range(repeats)]
    result = dict(runs[-1])
    for key in (*METRICS, "wall_s", "mean_tokens"):
        result[key] = median([run[key] for run in runs])
    if "ttft_breakdown" in result:
        result["ttft_breakdown"] = {key: None if value is None else median([run["ttft_breakdown"][key] for run in runs])
                                    for key, value in result["ttft_breakdown"].items()}
    result["repeats"] = [{key: run[key] for key in METRICS} for run in runs]
    return result


def goals(runs: list[dict]) -> dict:
    """Same-run ratios against one question at a time (concurrency 1)."""
    by_level = {run["concurrency"]: run for run in runs}
    if 1 not in by_level:
        return {}
    single = by_level[1]
    out = {}
    for level, run in by_level.items():
        if level > 1:
            out[str(level)] = {"throughput_vs_sequential": run["questions_per_s"] / single["questions_per_s"],
                               "ttft_p95_vs_single_p50": run["ttft_p95_s"] / single["ttft_p50_s"]}
    return out


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"Serving, {result['model']} ({result['dtype']}, {result['device']}), {machine['threads']} threads, "
             f"{machine['cpu']}, {machine['date']}",
             f"command: `{machine['command']}`",
             f"{result['config']['questions']} questions per level over the bundled corpus ({result['documents']} "
             f"documents, {result['chunks']} chunks, top-{result['config']['top_k']} retrieval), at most "
             f"{result['config']['max_new_tokens']} new tokens (greedy), median of {result['config']['repeats']} "
             f"run(s); load average (1 min) at start / end {result['load_average'][0]:.1f} / "
             f"{result['load_average'][1]:.1f}", "",
             "| engine | concurrency | questions/s | tokens/s | TTFT p50 | TTFT p95 | peak MiB per active request "
             "| largest batch so far |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("kvpacket", run) for run in result["runs"]]
    if result.get("reference"):
        rows.append((f"transformers generate, full prompt, sequential ({result['reference']['questions']} "
                     "questions)", result["reference"]))
    for name, run in rows:
        lines.append(f"| {name} | {run['concurrency']} | {run['questions_per_s']:.2f} | {run['tokens_per_s']:.1f} | "
                     f"{_ms(run['ttft_p50_s'])} | {_ms(run['ttft_p95_s'])} | {run['peak_mb_per_active_request']:.0f} | "
                     f"{run.get('max_batch', 1)} |")
    lines += ["", "Time to first token, medians per question: the first wave is the questions asked at once when a level "
              "starts (their prefills share one forward), later ones join a running batch.", "",
              "| concurrency | retrieval | queue | prefill forward | TTFT first wave | TTFT later p50 | TTFT later p95 |",
              "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        b = run["ttft_breakdown"]
        later = [_ms(b[key]) if b[key] is not None else "–" for key in ("later_ttft_p50_s", "later_ttft_p95_s")]
        lines.append(f"| {run['concurrency']} | {_ms(b['retrieval_p50_s'])} | {_ms(b['queue_p50_s'])} | "
                     f"{_ms(b['prefill_forward_p50_s'])} | {_ms(b['first_wave_ttft_p50_s'])} | {later[0]} | {later[1]} |")
    if result["goals"]:
        lines += ["", "Against one question at a time (concurrency 1, same run):", ""]
        for level, ratios in result["goals"].items():
            lines.append(f"- {level} concurrent: {ratios['throughput_vs_sequential']:.2f}× the questions/s; "
                         f"TTFT p95 {ratios['ttft_p95_vs_single_p50']:.2f}× the single-request TTFT (p50)")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def run(args: argparse.Namespace) -> dict:
    from ..demo import load_corpus, quiet_embedder, suggested_questions
    from ..engine import PacketEngine
    from ..index import PacketIndex
    from ..scheduler import SchedulerConfig
    from ..store import LocalStore

    if args.questions < 1 or min(args.concurrency) < 1 or args.repeats < 1:
        raise ValueError("--questions, --concurrency and --repeats must be >= 1")
    tune_malloc()
    threads = set_threads(args.threads)
    load_start = os.getloadavg()[0]
    corpus = load_corpus()[: args.documents]
    asked = [q.question for q in suggested_questions()]
    questions = list(itertools.islice(itertools.cycle(asked), args.questions))
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="kvpacket-bench-serve-") as tmp:
        engine = PacketEngine(args.model, adapter=None if args.adapter == "none" else args.adapter,
                              store=LocalStore(Path(tmp) / "packets"), device=args.device, dtype=args.dtype,
                              scheduler=SchedulerConfig(max_batch=max(args.concurrency)))
        index = PacketIndex(engine, quiet_embedder())
        index.add_documents(corpus)  # ingestion: packets built and stored before any timing
        run_level(index, questions[:2], 1, generation, args.top_k)  # warm-up: code paths, mapped packets
        runs = [repeated(lambda c=c: run_level(index, questions, c, generation, args.top_k), args.repeats)
                for c in args.concurrency]
        reference = repeated(lambda: run_reference(index, questions[: args.reference_questions], generation,
                                                   args.top_k),
                             args.repeats) if args.reference else None
        chunks = len(index)
    result = {**engine_header(engine, threads, store="LocalStore"), "documents": len(corpus), "chunks": chunks,
              "config": {"concurrency": args.concurrency, "questions": args.questions,
                         "max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "repeats": args.repeats},
              "runs": runs, "reference": reference, "goals": goals(runs), "peak_rss_mb": peak_rss_mb(),
              "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(result, table(result), args.json)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
