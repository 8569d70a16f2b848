"""`kvpacket eval`: methods side by side on a dataset (F1, fidelity, KL, TTFT, FLOPs) -> JSON, table, plots."""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

DEFAULT_METHODS = "full_recompute,no_recompute,closed_book,kv_packet,kv_packet_first_exact,cacheblend:0.15,epic:32"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate kv_packet against baselines on a dataset",
        description="Answer n questions of a dataset with each method (packets built before timing, first question "
                    "a warm-up) and report F1, EM, recall, fidelity and KL against full recompute, TTFT and FLOPs.")
    parser.add_argument("--dataset", required=True,
                        help="biography, hotpotqa, niah, squad, or a .jsonl file of {chunks, question, answers}")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated method specs (default: {DEFAULT_METHODS}); full_recompute is always run")
    parser.add_argument("--n", type=int, default=100, help="number of questions (default 100)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--order", default="dataset", choices=("dataset", "retrieval"),
                        help="chunk order of every question: the dataset's (default), or ranked by the default "
                             "embedder's similarity to the question, most similar first, as a retriever returns them")
    parser.add_argument("--no-kl", action="store_true", help="skip the teacher-forced KL pass (faster)")
    parser.add_argument("--json", default=None,
                        help="write the result here (and the markdown table beside it); per-question records go to "
                             "JSON.partial.jsonl (JSON.retrieval.partial.jsonl with --order retrieval) as they come, "
                             "so an interrupted run resumes where it stopped")
    parser.add_argument("--plot", action="store_true", help="also write PNGs next to --json")
    parser.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                        help="store the packets at this precision, in a LocalStore in a temporary directory "
                             "(measures what int8/int4 packets cost in quality); default: full precision in memory")
    parser.add_argument("--append", action="store_true",
                        help="add these methods to the result already in --json (same questions and settings; "
                             "full_recompute is rerun as the reference and must give the same answers)")
    from .common import add_calibration_arguments, add_model_arguments

    add_calibration_arguments(parser, "the evaluated questions' passages (the served corpus)")
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def command_line(args: argparse.Namespace) -> str:
    """The `kvpacket eval` command that reproduces this run, every setting spelled out."""
    from .common import calibration_flags

    parts = ["kvpacket", "eval", "--dataset", args.dataset, "--methods", args.methods, "--n", str(args.n),
             "--split", args.split, "--seed", str(args.seed), "--max-new-tokens", str(args.max_new_tokens)]
    if args.order != "dataset":
        parts += ["--order", args.order]
    if args.quantization != "none":
        parts += ["--quantization", args.quantization]
    parts += calibration_flags(args)
    for flag in ("model", "adapter", "device", "dtype", "threads", "json"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag}", str(value)]
    parts += ["--no-kl"] * args.no_kl + ["--plot"] * args.plot + ["--append"] * args.append
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvalConfig
    from ..evaluation.merge import check_settings
    from ..evaluation.run import prepare_process
    from ..store import LocalStore
    from .common import calibration_config, make_engine

    if (args.plot or args.append) and not args.json:
        raise ValueError("--plot and --append need --json PATH (the result file to write or extend)")
    existing = json.loads(Path(args.json).read_text()) if args.append and Path(args.json).is_file() else None
    if existing is not None:
        check_settings(existing, {"dataset": args.dataset, "split": args.split, "seed": args.seed, "n": args.n,
                                  "max_new_tokens": args.max_new_tokens, "quantization": args.quantization,
                                  "order": args.order})
    prepare_process(args.threads)
    config = EvalConfig(tuple(s.strip() for s in args.methods.split(",") if s.strip()),
                        max_new_tokens=args.max_new_tokens, kl=not args.no_kl, calibration=calibration_config(args),
                        order=args.order)
    with tempfile.TemporaryDirectory(prefix="kvpacket-eval-") as packet_dir:
        store = None if args.quantization == "none" else LocalStore(packet_dir, quantization=args.quantization)
        return _evaluate_and_write(args, config, make_engine(args, store), existing)


def _evaluate_and_write(args: argparse.Namespace, config, engine, existing: dict | None) -> int:
    from ..evaluation import run_evaluation, write_result
    from ..evaluation.merge import merge_results
    from ..evaluation.run import checkpoint_path
    from ..evaluation.table import markdown_table

    checkpoint = checkpoint_path(args.json, args.order) if args.json else None
    if checkpoint is not None and args.append:
        checkpoint = checkpoint.with_name(checkpoint.name.replace(".partial", ".append.partial"))
    result = run_evaluation(engine, args.dataset, args.n, config, split=args.split, seed=args.seed,
                            adapter_spec=args.adapter, checkpoint=checkpoint)
    result["machine"]["command"] = command_line(args)
    if existing is not None:
        result = merge_results(existing, result)
    print(markdown_table(result))
    for path in write_result(result, args.json, args.plot):
        print(f"wrote {path}")
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return 0
