"""The recipe of the build-time LoRA candidate adapter (SmolLM2-135M-Instruct), as one command:

    python training/recipes/smollm2_build_lora.py

Starts from the shipped stage-4 adapter (``smollm2_default.py``) and adds rank-8 low-rank updates of every
attention projection that apply only while packets are built (``--lora-rank 8``, scale 16/8, initialised to
change nothing). One epoch over the stage-4 samples and cached teacher outputs: 48 steps of 8, peak lr 2e-3 for
the low-rank updates and 3e-3 for the soft tokens, linear decay. Writes
``benchmarks/adapter/candidates/smollm2-135m-instruct-build-lora.safetensors``; an interrupted run continues
from its last checkpoint in ``runs/smollm2_default/build_lora.run``. About 35 minutes on 2 CPU cores (teacher
outputs cached) — see benchmarks/adapter/README.md.
"""

from __future__ import annotations

import sys

from smollm2_default import CANDIDATES, OUT, PREAMBLE, stage

BUILD_LORA = CANDIDATES / "smollm2-135m-instruct-build-lora.safetensors"
ARGUMENTS = stage("build_lora", PREAMBLE, 1, "3e-3", BUILD_LORA, OUT) + ["--lora-rank", "8", "--lora-alpha", "16",
                                                                         "--lora-lr", "2e-3"]


def main(extra: list[str] | None = None) -> int:
    """Train the candidate (``extra`` arguments are appended, e.g. ``["--no-progress"]``)."""
    from kvpacket_rag.cli import main as cli_main

    return cli_main(["train", *ARGUMENTS, *(extra or [])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
