"""`kvpacket build` and `kvpacket ask`: packets from files, and one question over them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EmptyInputError, InvalidInputError
from ..generation import GenerationConfig
from .common import add_calibration_arguments, add_model_arguments, calibrate_engine, make_engine

SAMPLE_DOCS = Path(__file__).resolve().parent.parent / "data" / "samples"


def register(subparsers) -> None:
    build = subparsers.add_parser("build", help="build one packet per document file into a store")
    build.add_argument("--docs", nargs="+", required=True, type=Path, help="text files (one chunk each) or directories")
    build.add_argument("--out", "--store", dest="store", required=True, help="store directory or redis:// URL")
    add_calibration_arguments(build, "the documents (ask over the same documents with the same options)")
    add_model_arguments(build)
    build.set_defaults(handler=run_build)

    ask = subparsers.add_parser("ask", help="answer a question over documents through their packets")
    ask.add_argument("--docs", nargs="+", type=Path, default=[SAMPLE_DOCS],
                     help="text files or directories (default: the bundled sample documents)")
    ask.add_argument("--question", required=True)
    ask.add_argument("--method", default=None,
                     help="kv_packet_first_exact (default) | kv_packet | no_recompute | full_recompute | closed_book | "
                          "cacheblend:R | epic:K | kv_packet_refresh:K")
    ask.add_argument("--store", default=None, help="store directory or redis:// URL (default: in memory)")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--json", action="store_true", help="print the answer, timings and FLOPs as JSON")
    add_calibration_arguments(ask, "the documents")
    add_model_arguments(ask)
    ask.set_defaults(handler=run_ask)


def read_documents(paths: list[Path]) -> list[tuple[str, str]]:
    """``(name, text)`` of every ``.txt``/``.md`` file in ``paths`` (directories expanded, sorted).

    Raises:
        FileNotFoundError: a path does not exist. EmptyInputError: no non-empty document.
        InvalidInputError: a file is not UTF-8 text or cannot be read (the message names it).
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():  # entries that are directories (even one named x.md) are not documents
            files += sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"document path {path} does not exist (or is not a regular file)")
    docs = [(f.name, _read_text(f)) for f in files]
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise EmptyInputError(f"no non-empty .txt/.md documents found in {', '.join(map(str, paths))}")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"document {path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                                "convert it (e.g. `iconv -t UTF-8`) or leave it out") from None
    except OSError as error:
        raise InvalidInputError(f"cannot read document {path}: {error.strerror or error}") from None


def _open_store(spec: str | None):
    if spec is None:
        return None
    from ..store import open_store

    return open_store(spec)


def run_build(args: argparse.Namespace) -> int:
    docs = read_documents(args.docs)
    engine = make_engine(args, store=_open_store(args.store))
    calibrate_engine(engine, args, [text for _, text in docs])
    keys = engine.ingest_packets([text for _, text in docs], progress=True)
    for (name, _), key in zip(docs, keys):
        print(f"{key}  {name}")
    print(f"{engine.counters['packets_built']} built, {engine.counters['packets_loaded']} already stored",
          file=sys.stderr)
    return 0


def run_ask(args: argparse.Namespace) -> int:
    docs = read_documents(args.docs)
    engine = make_engine(args, store=_open_store(args.store))
    calibrate_engine(engine, args, [text for _, text in docs])
    answer = engine.answer(args.question, [text for _, text in docs], method=args.method,
                           generation=GenerationConfig(max_new_tokens=args.max_new_tokens))
    if args.json:
        print(json.dumps({**answer.to_dict(), "sources": [name for name, _ in docs]}, indent=2))
    else:
        print(answer.text)
        t = answer.timings
        print(f"[{answer.method}] ttft {t['ttft_s'] * 1000:.0f} ms (load {t['packet_load_s'] * 1000:.0f}, "
              f"build {t['packet_build_s'] * 1000:.0f}, assemble {t['assembly_s'] * 1000:.0f}, "
              f"prefill {t['question_prefill_s'] * 1000 + t['context_prefill_s'] * 1000:.0f} ms), "
              f"{answer.forwarded_tokens} tokens forwarded", file=sys.stderr)
    return 0
