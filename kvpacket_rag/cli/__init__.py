"""The `kvpacket` command line. Each concern registers its subcommands from its own module.

Bad input never prints a traceback: one line says what is wrong and what to do, and the exit status
says what kind of failure it was:

====  ========================================================================================
 0    success
 1    the command ran and reports findings (``store verify``: bad entries; ``store rm``: keys not stored)
 2    usage or configuration error: bad arguments, a path or store that does not exist, a bad option,
      a model and adapter that do not go together
 3    bad data: a document, packet, adapter or saved index is malformed, damaged or not UTF-8
 4    unavailable: a store server or model cannot be reached now (retry, or fix the network/URL)
 70   internal error (a bug): one line, plus the traceback with ``kvpacket --traceback ...``
 130  interrupted (Ctrl-C)
====  ========================================================================================
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CorruptIndexError, CorruptPacketError, InvalidInputError, KVPacketError, ModelUnavailableError

EXIT_FINDINGS, EXIT_USAGE, EXIT_BAD_DATA, EXIT_UNAVAILABLE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 70, 130

# Modules that define `register(subparsers)`; each adds its subcommands with `set_defaults(handler=...)`.
COMMAND_MODULES = ["ask", "store", "bench", "train", "calibrate", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpacket", description="KV-packet RAG: build packets, ask, train, evaluate.",
                                     epilog="exit status: 0 ok, 1 findings, 2 usage, 3 bad data, 4 unavailable, "
                                            "70 internal error")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback of an internal error")
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


def exit_status(error: BaseException) -> int:
    """The exit status for an error that ended a command (see the module docstring)."""
    from ..store import StoreUnavailableError

    if isinstance(error, (CorruptPacketError, CorruptIndexError, InvalidInputError, UnicodeDecodeError)):
        return EXIT_BAD_DATA
    if isinstance(error, (StoreUnavailableError, ModelUnavailableError)):
        return EXIT_UNAVAILABLE
    if isinstance(error, (KVPacketError, ValueError, OSError)):
        return EXIT_USAGE
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (argparse exits with 2 itself on bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
        return status if isinstance(status, int) else 0
    except KeyboardInterrupt:
        print(f"kvpacket {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every error ends as one line and a status
        status = exit_status(error)
        if status == EXIT_INTERNAL:
            if args.traceback:
                raise
            print(f"kvpacket {args.command}: internal error: {type(error).__name__}: {_one_line(error)}; this is a "
                  "bug: rerun with `kvpacket --traceback ...` and report it", file=sys.stderr)
        else:
            print(f"kvpacket {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return status


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:1000] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
