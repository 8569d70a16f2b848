"""One evaluation run end to end: load samples, evaluate, attach the facts a result needs, write files."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..benchmarks.common import machine_info, peak_rss_mb
from ..datasets import load_samples
from ..engine import PacketEngine
from ..tuning import set_threads, tune_malloc
from .harness import EvalConfig, evaluate
from .table import markdown_table

FORMAT = "kvpacket-eval/1"
THIRD_PARTY = ("hotpotqa", "squad", "niah")
"""Datasets read from a third-party wheel (CC BY-SA / unlicensed text): their records keep no text."""
TEXT_FIELDS = ("prediction", "answers")


def run_evaluation(engine: PacketEngine, dataset: str, n: int, config: EvalConfig, split: str = "test",
                   seed: int = 0, adapter_spec: str | None = None, keep_text: bool | None = None,
                   checkpoint: str | Path | None = None) -> dict:
    """Evaluate ``config.methods`` on ``n`` samples of ``dataset`` and describe the run.

    Args:
        keep_text: keep predictions and gold answers in the per-sample records (default: yes, except for
            the `THIRD_PARTY` datasets, whose text must not be copied into result files).
        checkpoint: see `evaluate` (resumes an interrupted run).

    Returns:
        The `evaluate` result plus ``format``, ``dataset``, ``split``, ``seed``, ``n``, ``order``, ``max_new_tokens``,
        ``model``, ``adapter``, ``store``, ``quantization`` (of the stored packets), ``machine`` (CPU, threads, date, command), ``wall_s``,
        ``process_peak_rss_mb``, ``records_text`` and ``resumed`` (samples taken from the checkpoint;
        ``wall_s`` covers only this process).
    """
    samples = load_samples(dataset, split, n, seed)
    started = time.perf_counter()
    result = evaluate(engine, samples, config, checkpoint)
    keep_text = dataset not in THIRD_PARTY if keep_text is None else keep_text
    if not keep_text:
        for summary in result["methods"].values():
            summary["records"] = [{k: v for k, v in r.items() if k not in TEXT_FIELDS} for r in summary["records"]]
    threads = set_threads(None)
    adapter = engine.adapter
    return {
        "format": FORMAT, "dataset": dataset, "split": split, "seed": seed, "n": len(samples), "order": config.order,
        "max_new_tokens": config.max_new_tokens,
        "model": {"name": engine.model.name, "fingerprint": engine.model.fingerprint[:16],
                  "dtype": str(engine.model.dtype).removeprefix("torch."), "device": str(engine.model.device),
                  "layers": engine.model.num_layers},
        "adapter": {"spec": adapter_spec, "fingerprint": adapter.fingerprint[:16], "n_header": adapter.n_header,
                    "n_trailer": adapter.n_trailer, "card": _json_safe(adapter.card),
                    "neighbour_calibration": asdict(config.calibration) if config.calibration else None},
        "store": type(engine.store).__name__, "quantization": engine.store.quantization,
        "machine": machine_info(threads),
        "wall_s": time.perf_counter() - started, "process_peak_rss_mb": peak_rss_mb(), "records_text": keep_text,
        **result,
    }


def checkpoint_path(json_path: str | Path, order: str = "dataset") -> Path:
    """Where a run writing ``json_path`` keeps its per-sample checkpoint: ``<json>.partial.jsonl``, or
    ``<json>.<order>.partial.jsonl`` for another chunk order (a run never resumes from the records of another order,
    whose questions have the same ids)."""
    path = Path(json_path)
    return path.with_name(path.name + ("" if order == "dataset" else f".{order}") + ".partial.jsonl")


def write_result(result: dict, json_path: str | Path | None, plot: bool = False) -> list[Path]:
    """Write ``result`` as JSON, its markdown table beside it (``.md``) and, with ``plot``, PNGs.

    Returns:
        The paths written.

    Raises:
        ValueError: ``plot`` without ``json_path`` (plots are named after the JSON file).
    """
    if json_path is None:
        if plot:
            raise ValueError("--plot needs --json PATH: the PNGs are written next to the JSON file")
        return []
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(result) + "\n")
    written = [path, path.with_suffix(".md")]
    written[1].write_text(markdown_table(result) + "\n")
    if plot:
        from .plots import write_plots

        written += write_plots(result, path.with_suffix(""))
    return written


def to_json(result: dict) -> str:
    """Indented JSON with each per-sample record on one line (small files, readable diffs)."""
    methods, records = {}, {}
    for name, summary in result["methods"].items():
        records[name] = summary["records"]
        methods[name] = {**summary, "records": f"@records:{name}@"}
    text = json.dumps({**result, "methods": methods}, indent=1, ensure_ascii=False)
    for name, rows in records.items():
        lines = ",\n   ".join(json.dumps(row, ensure_ascii=False) for row in rows)
        text = text.replace(json.dumps(f"@records:{name}@"), f"[\n   {lines}\n  ]" if rows else "[]", 1)
    return text


def prepare_process(threads: int | None) -> int:
    """Tune malloc and set torch threads before measuring; return the thread count in force."""
    tune_malloc()
    return set_threads(threads)


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))
