"""The `kvpacket` command line. Each concern registers its subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import KVPacketError

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(handler=...)`.
COMMAND_MODULES = ["ask", "store", "bench", "train", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpacket", description="KV-packet RAG: build packets, ask, train, evaluate.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"{__name__}.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        return status if isinstance(status, int) else 0
    except (KVPacketError, ValueError, FileNotFoundError) as error:
        print(f"kvpacket {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
