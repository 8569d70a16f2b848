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
