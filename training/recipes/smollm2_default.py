"""The recipe of the shipped default adapter (SmolLM2-135M-Instruct, mixture of biography, HotpotQA, NIAH).

Run from the repository root, as one command:

    python -m training.recipes.smollm2_default

It is exactly ``kvpacket train`` with `ARGS` below, writing
``kvpacket_rag/adapters/smollm2-135m-instruct.safetensors`` and its JSON card. Checkpoints, ``log.json``
and ``loss.png`` go to ``runs/smollm2_default/`` and teacher outputs to ``runs/teacher/``; an interrupted run
continues where it stopped when the command is run again (it passes ``--resume``).

Choices, for a 2-core CPU budget of about an hour (see benchmarks/adapter/ for the measurements):
- short contexts (2-5 biographies, the first 6 HotpotQA paragraphs, 3 essay slices of 150 words): the
  adapter acts per chunk, and a shorter sample costs less per optimizer step;
- teacher answers capped at 48 tokens, stored as the top 256 log-probabilities plus the rest mass;
- small batches and a high peak learning rate (chosen by a pilot) so that a few hundred steps suffice;
- one torch thread, which degrades gracefully when the two cores are shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "kvpacket_rag" / "adapters" / "smollm2-135m-instruct.safetensors"

DATA_OPTIONS = {"biography": {"docs_per_sample": [2, 3, 4, 5]}, "niah": {"n_chunks": 3, "chunk_words": 150}}
ARGS = [
    "--data", "biography:0.5,hotpotqa:0.375,niah:0.125",
    "--data-options", json.dumps(DATA_OPTIONS, separators=(",", ":")),
    "--max-chunks", "6",
    "--samples", "256",
    "--epochs", "2",
    "--batch-size", "4",
    "--lr", "3e-2",
    "--n-header", "8",
    "--n-trailer", "8",
    "--seed", "1",
    "--answer-cap", "48",
    "--teacher-top-k", "256",
    "--threads", "1",
    "--checkpoint-every", "16",
    "--run-dir", str(ROOT / "runs" / "smollm2_default"),
    "--teacher-cache", str(ROOT / "runs" / "teacher"),
    "--resume",
    "--out", str(OUT),
]


def main(extra: list[str] | None = None) -> int:
    """Run the recipe (``extra`` arguments are appended, e.g. ``["--no-progress"]``)."""
    from kvpacket_rag.cli import main as cli_main

    return cli_main(["train", *ARGS, *(extra or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
