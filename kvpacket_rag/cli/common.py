"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse

import torch


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --device, --dtype, --threads."""
    parser.add_argument("--model", default=None, help="Hugging Face id or directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default="default",
                        help="adapter file, 'default' (shipped adapter of the default model) or 'none'; "
                             "'+preamble' builds its packets after the chat preamble")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def make_engine(args: argparse.Namespace, store=None):
    """A PacketEngine from the parsed model arguments."""
    from ..engine import PacketEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..errors import IncompatiblePacketError

    try:
        return PacketEngine(args.model, adapter=args.adapter, store=store, device=args.device, dtype=args.dtype)
    except IncompatiblePacketError as error:  # speak in command-line options, not keyword arguments
        raise IncompatiblePacketError(str(error).replace("pass adapter=None", "pass --adapter none")) from None


def add_calibration_arguments(parser: argparse.ArgumentParser, corpus: str, depth_default: str = "4") -> None:
    """--calibrate-neighbours, --calibration-contexts, --calibration-depth, --calibrate-by-place (``corpus`` names
    the passages, ``depth_default`` the depth's default in the help)."""
    parser.add_argument("--calibrate-neighbours", type=int, default=0, metavar="N",
                        help=f"build each chunk's adapter packet after contexts drawn from its N nearest passages "
                             f"among {corpus} (measured with --adapter none+preamble: bare packets); 0 (default): "
                             f"as the adapter builds them")
    parser.add_argument("--calibration-contexts", type=int, default=None,
                        help="with --calibrate-neighbours: contexts per chunk (each one more forward per place; "
                             "default 4)")
    parser.add_argument("--calibration-depth", type=int, default=None,
                        help=f"with --calibrate-neighbours: passages per context (default {depth_default})")
    parser.add_argument("--calibrate-by-place", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calibrate-neighbours: one packet per place among the retrieved chunks, a chunk "
                             "at place p built after min(p, depth) passages (place 0: none); set the depth to the "
                             "number of retrieved chunks minus one (default: on; --no-calibrate-by-place builds one "
                             "packet per chunk after depth passages)")


def calibration_config(args: argparse.Namespace, places: int | None = None):
    """The `CalibrationConfig` of the calibration arguments, or None without --calibrate-neighbours.

    ``places``: chunks read per question, where the command knows it (its top-k); without --calibration-depth the
    depth is then ``places - 1`` (at least 1), the deepest place a chunk is read at, so no unread place is built.
    """
    from ..calibration import CalibrationConfig

    if not args.calibrate_neighbours:
        if args.calibrate_by_place:
            raise ValueError("--calibrate-by-place needs --calibrate-neighbours N (the nearest passages to draw from)")
        return None
    depth = args.calibration_depth
    if depth is None and places is not None:
        depth = max(1, places - 1)
    return CalibrationConfig(args.calibration_contexts, depth, neighbours=args.calibrate_neighbours,
                             by_place=args.calibrate_by_place)


def calibration_flags(args: argparse.Namespace) -> list[str]:
    """The calibration arguments, defaults spelt out (for reproducing a command); empty without
    --calibrate-neighbours."""
    config = calibration_config(args)
    if config is None:
        return []
    return ["--calibrate-neighbours", str(config.neighbours), "--calibration-contexts", str(config.contexts),
            "--calibration-depth", str(config.depth), "--calibrate-by-place" if config.by_place
            else "--no-calibrate-by-place"]


def calibrate_engine(engine, args: argparse.Namespace, passages: list[str]) -> None:
    """With --calibrate-neighbours, point ``engine`` at neighbour contexts over ``passages``."""
    config = calibration_config(args)
    if config is None:
        return
    from ..calibration import NeighbourContexts
    from ..embedder import Embedder

    engine.calibrate_on(NeighbourContexts(passages, engine.formatter, Embedder(), config))
