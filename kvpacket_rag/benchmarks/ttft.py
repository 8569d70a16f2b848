"""`kvpacket bench ttft`: time to first token of kv_packet against recompute methods, over context sizes.

Packets are built and stored before timing (ingestion is offline). Each measured call answers one
question over ``chunks`` chunks of about ``tokens`` tokens (one ``--sizes`` entry, ``CHUNKSxTOKENS``),
generating one token; TTFT runs from the call to the first token and includes reading packets from
the store. Every size runs every ``--methods`` entry on the same engine and clock, so the ratios
are same-run ratios. The question path's peak memory is the peak of the heap in use (glibc
``mallinfo2``, sampled every millisecond) during one untimed call that starts without KV buffers,
minus the heap in use before it, per context token; mapped packet files are not heap and not counted.

``--forms`` repeats kv_packet at ``--forms-size`` with packets read from a LocalStore in each
quantized form (the question path decodes them into the assembly buffer).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import tempfile
import threading
from pathlib import Path

from ..datasets import load_samples
from ..engine import PacketEngine
from ..generation import GenerationConfig
from ..methods import get_method
from ..tuning import set_threads, tune_malloc
from .common import engine_header, median, peak_rss_mb, write_outputs

BREAKDOWN = ("packet_load_s", "assembly_s", "context_prefill_s", "question_prefill_s", "ttft_s")
QUESTION = "What is the special magic number mentioned in the documents?"
METHODS = ("kv_packet_first_exact", "kv_packet", "full_recompute", "cacheblend:0.15", "epic:32")
SIZES = ("2x128", "4x256", "8x256", "8x512", "12x512", "15x512")


def size(text: str) -> tuple[int, int]:
    """``CHUNKSxTOKENS`` as a pair of positive ints."""
    try:
        chunks, tokens = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not CHUNKSxTOKENS, e.g. 8x512") from None
    if chunks < 1 or tokens < 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: need at least 1 chunk of 8 tokens")
    return chunks, tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=size, nargs="+", default=[size(s) for s in SIZES],
                        help="contexts as CHUNKSxTOKENS (default: 2x128 up to 15x512, the default model's limit)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to time at every size")
    parser.add_argument("--forms", nargs="*", default=["none", "int8", "int4"],
                        help="packet quantizations to compare with kv_packet at --forms-size (none: skip)")
    parser.add_argument("--forms-size", type=size, default=(8, 512))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method and size (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", default=None, help="store directory or redis:// URL (default: a temporary LocalStore)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--plot", default=None, help="write a TTFT-against-context plot here (PNG)")
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use() -> int:
    """Bytes of heap memory in use (glibc ``mallinfo2``: allocated chunks plus mapped blocks; memory malloc
    keeps after a free does not count); the resident set where mallinfo2 is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    except (OSError, AttributeError):
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096


class HeapPeak:
    """Samples `heap_in_use` every millisecond inside a ``with`` block: ``start`` and ``peak`` in bytes."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "HeapPeak":
        self.start = self.peak = heap_in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, heap_in_use())

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, heap_in_use())


def measure(engine: PacketEngine, method: str, chunks: list[str], repeats: int) -> dict:
    """Median timings of ``repeats`` calls after one warm-up; the warm-up (untimed) measures memory: the
    engine's KV buffers are dropped first, so the peak counts the assembled cache and every transient."""
    generation = GenerationConfig(max_new_tokens=1)
    engine.answer(QUESTION, chunks, method=method, generation=generation)  # packets mapped, code paths warm
    engine.release_buffers()
    with HeapPeak() as heap:
        first = engine.answer(QUESTION, chunks, method=method, generation=generation)
    runs = [engine.answer(QUESTION, chunks, method=method, generation=generation) for _ in range(repeats)]
    last = runs[-1]
    result = {key: median([r.timings[key] for r in runs]) for key in BREAKDOWN}
    peak = heap.peak - heap.start
    result.update(ttft_runs_s=[r.timings["ttft_s"] for r in runs], flops=last.prefill_flops,
                  context_flops=last.context_flops, forwarded_tokens=last.forwarded_tokens,
                  question_path_peak_mb=peak / 2**20,
                  question_path_bytes_per_context_token=peak / (first.context_tokens + first.question_tokens))
    result["overhead_s"] = result["packet_load_s"] + result["assembly_s"]
    result["overhead_fraction"] = result["overhead_s"] / result["ttft_s"]
    return result


def run_one(engine: PacketEngine, n_chunks: int, chunk_tokens: int, methods: list[str], repeats: int) -> dict:
    chunks = make_chunks(engine, n_chunks, chunk_tokens)
    for name in methods:  # before timing, as at ingestion (the recompute baselines read bare packets)
        get_method(name).fetch_packets(engine, chunks)
    timed = {name: measure(engine, name, chunks, repeats) for name in methods}
    context_tokens = engine.answer(QUESTION, chunks, generation=GenerationConfig(max_new_tokens=1)).context_tokens
    out = {"chunks": n_chunks, "chunk_tokens": chunk_tokens, "context_tokens": context_tokens, "methods": timed}
    if "kv_packet" in timed and "full_recompute" in timed:
        packet, full = timed["kv_packet"], timed["full_recompute"]
        out.update(speedup=full["ttft_s"] / packet["ttft_s"], flops_ratio=packet["flops"] / full["flops"],
                   context_flops_ratio=packet["context_flops"] / full["context_flops"])
    return out


def run_forms(engine: PacketEngine, forms: list[str], n_chunks: int, chunk_tokens: int, repeats: int,
              workdir: Path) -> dict:
    """kv_packet TTFT with packets read from a LocalStore in each form (same chunks, same engine)."""
    from ..store import LocalStore

    chunks = make_chunks(engine, n_chunks, chunk_tokens)
    saved, out = engine.store, {}
    try:
        for form in forms:
            engine.store = LocalStore(workdir / f"forms-{form}", quantization=form)
            engine.build_packets(chunks)
            out[form] = measure(engine, "kv_packet", chunks, repeats)
            out[form]["stored_bytes"] = engine.store.stats()["bytes"]
            engine.store.close()
    finally:
        engine.store = saved
    return out


def growth(runs: list[dict], method: str) -> float:
    """TTFT at the largest context over TTFT at the smallest."""
    return runs[-1]["methods"][method]["ttft_s"] / runs[0]["methods"][method]["ttft_s"]


def table(result: dict) -> str:
    runs, methods = result["runs"], result["config"]["methods"]
    lines = [f"TTFT, {result['model']} ({result['dtype']}, {result['device']}), {result['machine']['threads']} threads, "
             f"{result['machine']['cpu']}, {result['machine']['date']}",
             f"command: `{result['machine']['command']}`",
             f"median of {result['config']['repeats']} calls after one warm-up; packets in a {result['store']}"
             + (f"; load average (1 min) at start / end {result['load_average'][0]:.1f} / {result['load_average'][1]:.1f}"
                if "load_average" in result else ""), "",
             "| chunks × tokens | context | " + " | ".join(f"{m} TTFT" for m in methods)
             + " | full / kv_packet | load+assembly share of kv_packet |",
             "|---|---|" + "---|" * (len(methods) + 2)]
    for run in runs:
        cells = [_ms(run["methods"][m]["ttft_s"]) for m in methods]
        speedup = f"{run['speedup']:.1f}×" if "speedup" in run else "n/a"
        share = f"{run['methods']['kv_packet']['overhead_fraction']:.0%}" if "kv_packet" in run["methods"] else "n/a"
        lines.append(f"| {run['chunks']} × {run['chunk_tokens']} | {run['context_tokens']} | " + " | ".join(cells)
                     + f" | {speedup} | {share} |")
    context_growth = runs[-1]["context_tokens"] / runs[0]["context_tokens"]
    lines += ["", f"Growth from {runs[0]['context_tokens']} to {runs[-1]['context_tokens']} context tokens "
              f"({context_growth:.1f}× the context): " + "; ".join(f"{m} {growth(runs, m):.1f}×" for m in methods) + "."]
    lines += ["", "Question-path peak memory (peak heap in use during one call that allocates its KV buffer, minus "
              "the heap before it; mapped packet files not counted) and per context token:", "",
              "| chunks × tokens | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for run in runs:
        lines.append(f"| {run['chunks']} × {run['chunk_tokens']} | " + " | ".join(
            f"{run['methods'][m]['question_path_peak_mb']:.0f} MiB · "
            f"{run['methods'][m]['question_path_bytes_per_context_token'] / 1024:.0f} KiB/token" for m in methods) + " |")
    if "kv_packet" in methods:
        lines += ["", "kv_packet breakdown (median ms): " + "; ".join(
            f"{r['chunks']}×{r['chunk_tokens']}: load {r['methods']['kv_packet']['packet_load_s'] * 1e3:.1f}, "
            f"assembly {r['methods']['kv_packet']['assembly_s'] * 1e3:.1f}, "
            f"question prefill {r['methods']['kv_packet']['question_prefill_s'] * 1e3:.1f}" for r in runs)]
    if result.get("forms"):
        chunks, tokens = result["config"]["forms_size"]
        base = result["forms"].get("none")
        lines += ["", f"kv_packet by packet form at {chunks} × {tokens} (LocalStore, {result['dtype']} model):", "",
                  "| form | stored MB | TTFT | load | assembly | vs none |", "|---|---|---|---|---|---|"]
        for form, r in result["forms"].items():
            vs = f"{r['ttft_s'] / base['ttft_s']:.2f}×" if base else "n/a"
            lines.append(f"| {form} | {r['stored_bytes'] / 1e6:.0f} | {_ms(r['ttft_s'])} | {r['packet_load_s'] * 1e3:.1f} ms | "
                         f"{r['assembly_s'] * 1e3:.1f} ms | {vs} |")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def plot(result: dict, path: str) -> None:
    """TTFT against context tokens, one line per method, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    tokens = [run["context_tokens"] for run in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, style in zip(result["config"]["methods"], ("s-", "o-", "^-", "v-", "d-", "x-")):
        ax.plot(tokens, [run["methods"][method]["ttft_s"] * 1e3 for run in runs], style, label=method)
    if "speedup" in runs[0]:
        for x, run in zip(tokens, runs):
            ax.annotate(f"{run['speedup']:.0f}×", (x, run["methods"]["kv_packet"]["ttft_s"] * 1e3),
                        textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    machine = result["machine"]
    ax.set(xlabel="context tokens", ylabel="TTFT (ms, median)", yscale="log",
           title=f"{result['model']}, {machine['threads']} threads, {machine['date']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    tune_malloc()
    threads = set_threads(args.threads)
    load_start = os.getloadavg()[0]
    sizes = sorted(args.sizes, key=lambda s: s[0] * s[1])
    with tempfile.TemporaryDirectory(prefix="kvpacket-bench-") as tmp:
        store = _store(args.store or tmp)
        engine = PacketEngine(args.model, adapter=None if args.adapter == "none" else args.adapter, store=store,
                              device=args.device, dtype=args.dtype)
        runs = [run_one(engine, chunks, tokens, args.methods, args.repeats) for chunks, tokens in sizes]
        forms = [f for f in args.forms if f]
        by_form = run_forms(engine, forms, *args.forms_size, args.repeats, Path(tmp)) if forms else {}
    result = {**engine_header(engine, threads, store=type(store).__name__),
              "config": {"sizes": sizes, "methods": args.methods, "repeats": args.repeats, "forms": forms,
                         "forms_size": args.forms_size},
              "runs": runs, "forms": by_form, "peak_rss_mb": peak_rss_mb(),
              "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(result, table(result), args.json)
    if args.plot:
        plot(result, args.plot)
    return result


def _store(spec: str):
    from ..store import open_store

    return open_store(spec)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
