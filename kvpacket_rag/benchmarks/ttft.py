"""`kvpacket bench ttft`: time to first token of kv_packet vs full recompute on the same model and clock.

Packets are built and stored before timing (ingestion is offline). Each measured call answers one
question over ``--chunks`` chunks of about ``--chunk-tokens`` tokens, generating one token; TTFT runs
from the call to the first token and includes reading packets from the store.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ..datasets import load_samples
from ..engine import PacketEngine
from ..generation import GenerationConfig
from ..tuning import set_threads, tune_malloc
from .common import machine_info, median, peak_rss_mb, write_outputs

BREAKDOWN = ("packet_load_s", "assembly_s", "context_prefill_s", "question_prefill_s", "ttft_s")
QUESTION = "What is the special magic number mentioned in the documents?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", default=None, help="store directory or redis:// URL (default: a temporary LocalStore)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the result here (and a .md table beside it)")


def make_chunks(engine: PacketEngine, n_chunks: int, chunk_tokens: int) -> list[str]:
    """``n_chunks`` essay passages of about ``chunk_tokens`` tokens each (from the NIAH haystack)."""
    sample = load_samples("niah", "test", 1, n_chunks=n_chunks, chunk_words=int(chunk_tokens * 0.9))[0]
    tokenizer = engine.model.tokenizer
    chunks = []
    for text in sample.chunks:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: chunk_tokens - 2]
        chunks.append(tokenizer.decode(ids))
    return chunks


def measure(engine: PacketEngine, method: str, chunks: list[str], repeats: int) -> dict:
    generation = GenerationConfig(max_new_tokens=1)
    engine.answer(QUESTION, chunks, method=method, generation=generation)  # warm-up
    runs = [engine.answer(QUESTION, chunks, method=method, generation=generation) for _ in range(repeats)]
    last = runs[-1]
    result = {key: median([r.timings[key] for r in runs]) for key in BREAKDOWN}
    result.update(ttft_runs_s=[r.timings["ttft_s"] for r in runs], flops=last.prefill_flops,
                  context_flops=last.context_flops, forwarded_tokens=last.forwarded_tokens,
                  peak_rss_mb_after=peak_rss_mb())
    result["overhead_s"] = result["packet_load_s"] + result["assembly_s"]
    result["overhead_fraction"] = result["overhead_s"] / result["ttft_s"]
    return result


def run_one(engine: PacketEngine, n_chunks: int, chunk_tokens: int, repeats: int) -> dict:
    chunks = make_chunks(engine, n_chunks, chunk_tokens)
    engine.build_packets(chunks)
    methods = {name: measure(engine, name, chunks, repeats) for name in ("kv_packet", "full_recompute")}
    packet, full = methods["kv_packet"], methods["full_recompute"]
    context_tokens = engine.answer(QUESTION, chunks, generation=GenerationConfig(max_new_tokens=1)).context_tokens
    return {"chunks": n_chunks, "chunk_tokens": chunk_tokens, "context_tokens": context_tokens, "methods": methods,
            "speedup": full["ttft_s"] / packet["ttft_s"], "flops_ratio": packet["flops"] / full["flops"],
            "context_flops_ratio": packet["context_flops"] / full["context_flops"]}


def table(result: dict) -> str:
    lines = [f"TTFT, {result['model']} ({result['dtype']}, {result['device']}), {result['machine']['threads']} threads, "
             f"{result['machine']['cpu']}, {result['machine']['date']}",
             f"command: `{result['machine']['command']}`", "",
             "| chunks × tokens | context | full recompute TTFT | kv_packet TTFT | speedup | load+assembly share | FLOPs ratio (all / context only) |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        p, f = run["methods"]["kv_packet"], run["methods"]["full_recompute"]
        lines.append(f"| {run['chunks']} × {run['chunk_tokens']} | {run['context_tokens']} | {f['ttft_s']:.3f} s | "
                     f"{p['ttft_s'] * 1000:.1f} ms | {run['speedup']:.1f}× | {p['overhead_fraction']:.0%} | "
                     f"{run['flops_ratio']:.1e} / {run['context_flops_ratio']:.1e} |")
    lines += ["", "kv_packet breakdown (median ms): " + "; ".join(
        f"{r['chunks']}×{r['chunk_tokens']}: load {r['methods']['kv_packet']['packet_load_s'] * 1e3:.1f}, "
        f"assembly {r['methods']['kv_packet']['assembly_s'] * 1e3:.1f}, "
        f"question prefill {r['methods']['kv_packet']['question_prefill_s'] * 1e3:.1f}" for r in result["runs"])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    tune_malloc()
    threads = set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kvpacket-bench-") as tmp:
        store = _store(args.store or tmp)
        engine = PacketEngine(args.model, adapter=None if args.adapter == "none" else args.adapter, store=store,
                              device=args.device, dtype=args.dtype)
        runs = [run_one(engine, args.chunks, tokens, args.repeats) for tokens in args.chunk_tokens]
    result = {"model": engine.model.name, "device": str(engine.model.device), "dtype": str(engine.model.dtype),
              "adapter": engine.adapter.fingerprint[:12], "store": type(store).__name__, "threads": threads,
              "machine": machine_info(threads), "runs": runs, **runs[-1]}
    write_outputs(result, table(result), args.json)
    return result


def _store(spec: str):
    try:
        from ..store import open_store
    except ImportError:  # local store not available: measure from memory
        from ..store import InMemoryStore

        return InMemoryStore()
    return open_store(spec)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
