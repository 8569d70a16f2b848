"""`kvpacket bench ttft|store|serve|chat`: benchmarks that write JSON and a markdown table."""

from __future__ import annotations

import importlib

BENCHMARKS = {"ttft": "time to first token: kv_packet vs full recompute",
              "store": "packet store read/write throughput and quantization",
              "serve": "throughput and TTFT of one engine under concurrent questions",
              "chat": "cost of each chat turn with and without a chat session"}


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, help_text in BENCHMARKS.items():
        try:
            module = importlib.import_module(f"kvpacket_rag.benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        parser = kinds.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
