"""How many of the demo's suggested questions an adapter answers correctly through packets.

Each suggested question of the bundled corpus is asked in a fresh chat (no history) of ``kvpacket demo``'s
own pipeline (MiniLM + FAISS retrieval of 3 chunks, packets from a LocalStore, greedy, 48 new tokens), through
packets and by full recompute; an answer is correct when it contains the expected answer (case-insensitive).
The corpus and its questions are never used in training.

With ``--calibrate-neighbours N``, each chunk's adapter packet is built after contexts drawn from its N nearest
chunks of the corpus (as ``kvpacket demo --calibrate-neighbours N``).

Example:
    python benchmarks/quality/demo_questions.py --adapter default --threads 2 --json runs/demo_default.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from kvpacket_rag.calibration import CalibrationConfig
from kvpacket_rag.cli.common import add_calibration_arguments, calibration_config
from kvpacket_rag.demo import DemoChat, make_demo_engine, open_demo_index, suggested_questions
from kvpacket_rag.rag import PACKET_READINGS


def count_correct(adapter: str, threads: int, method: str = PACKET_READINGS[0],
                  calibration: CalibrationConfig | None = None) -> dict:
    """``{"kv_packet": k, "full_recompute": m, "n": n, "questions": [...]}`` for one adapter spec; ``kv_packet``
    counts the packet answers, read through ``method``, from an index with neighbour ``calibration`` if given."""
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as root:
        engine = make_demo_engine(adapter=adapter, store_dir=Path(root) / "packets", log=lambda _: None)
        index, _ = open_demo_index(engine, root=root, progress=False, log=lambda _: None, calibration=calibration)
        rows = []
        for suggestion in suggested_questions():
            chat = DemoChat(index, method=method)
            reply = chat.ask(suggestion.question, compare=True)
            expected = suggestion.answer.lower()
            rows.append({"question": suggestion.question, "expected": suggestion.answer,
                         "kv_packet": reply.packet.text, "full_recompute": reply.full.text,
                         "kv_packet_correct": expected in reply.packet.text.lower(),
                         "full_recompute_correct": expected in reply.full.text.lower()})
    return {"adapter": adapter, "method": method,
            "neighbour_calibration": asdict(calibration) if calibration is not None else None, "n": len(rows),
            "kv_packet": sum(r["kv_packet_correct"] for r in rows),
            "full_recompute": sum(r["full_recompute_correct"] for r in rows), "questions": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="default", help="'default', 'none' or an adapter file")
    parser.add_argument("--method", choices=PACKET_READINGS, default=PACKET_READINGS[0],
                        help="how packets are read (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    add_calibration_arguments(parser, "the corpus's chunks")
    parser.add_argument("--json", type=Path, default=None, help="write the per-question answers here")
    args = parser.parse_args(argv)
    result = count_correct(args.adapter, args.threads, args.method, calibration_config(args))
    for row in result["questions"]:
        mark = "ok " if row["kv_packet_correct"] else "MISS"
        print(f"{mark} {row['question']!r}: packets {row['kv_packet']!r} | full {row['full_recompute']!r}")
    print(f"{args.adapter}: {args.method} {result['kv_packet']}/{result['n']}, full recompute "
          f"{result['full_recompute']}/{result['n']}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
