"""The recipe of the shipped default adapter (SmolLM2-135M-Instruct, mixture of biography, HotpotQA, NIAH).

Run from the repository root, as one command:

    python training/recipes/smollm2_default.py

Eleven stages of ``kvpacket train`` (`STAGES`); a stage whose adapter file already exists is skipped (delete it
to train it again), and an interrupted stage continues from its last checkpoint (``--resume``):

1-3. Packets built from position 0 (the KV Packet paper's layout): 2 epochs = 128 optimizer steps of 4 samples
     each over 256 samples, from a random initialisation at peak lr 3e-2, then warm-started at 1e-2 twice.
4.   Packets built after the chat preamble (``--prefix preamble``): every chunk is computed right after the
     prompt's own prefix, sharing its attention sink, instead of from position 0. Warm-started from stage 3,
     over a new draw of 384 shorter samples (at most 4 chunks, teacher answers capped at 32 tokens), 2 epochs of
     batches of 8 (96 steps) at peak lr 1e-2.
5.   Build-time LoRA (``--lora-rank 8``): low-rank updates of every attention projection that apply only while
     packets are built, initialised to change nothing. One epoch over stage 4's samples and teacher outputs
     (48 steps of 8), peak lr 2e-3 for the updates and 3e-3 for the soft tokens.
6.   The same design over a fresh draw of 192 samples (seed 2) in which needle-in-a-haystack samples are longer
     (4 chunks of 300 words) and more frequent: one epoch, 24 steps of 8, same learning rates.
7.   More chunks per sample: a fresh draw of 192 samples (seed 3) with 3-5 biographies per sample and up to 6
     chunks, needles as in stage 6; one epoch, 24 steps of 8, same learning rates.
8-9. Two more fresh draws of the same mixture (seeds 4 and 5), one epoch each at a third of the learning rates
     (peak 1e-3 for the soft tokens, 7e-4 for the updates).
10.  Trained for the default reading and with a context loss: a fresh draw (seed 6), one epoch at stage 9's rates,
     with the first chunk of every sample read from its exact packet (``--exact-first``) and the first 128 tokens
     of each sample's last chunk read as text after the other packets and matched to full recompute
     (``--context-tokens 128 --context-weight 1``).
11.  A key/value loss: stage 10's training over a fresh draw (seed 7), one epoch, with the relative squared error
     of every packet's chunk keys and values against full recompute's keys and values of the same tokens in the
     sample's context added at weight 10 (``--kv-weight 10``). Stage 11 writes
     ``kvpacket_rag/adapters/smollm2-135m-instruct.safetensors`` and its JSON card.

Stages 1-10 keep their adapters in ``benchmarks/adapter/candidates/``, so a fresh checkout starts at stage 11.

Checkpoints, ``log.json`` and ``loss.png`` go to ``runs/smollm2_default/<stage>.run/``, teacher outputs to
``runs/teacher/``. Wall times on the 2-core CPU are in benchmarks/adapter/README.md: stages 1-3 took 2.4-2.9 h,
stage 4 1.3 h, stage 5 35 min, stage 6 40 min, stage 7 33 min (teacher pass included; 27 min with the current
per-chunk training student), stages 8 and 9 16 and 19 min with teacher outputs partly cached, stage 10 about
40 min with both of its teacher passes (measured by the same training on the next draw: answer teacher 11.5 min,
context teacher 6 min, 24 steps 21 min), stage 11 about 45 min (the same teacher passes, 24 steps of about 65 s:
the key/value loss adds one no-gradient full forward per sample); stage 11 is the part a fresh checkout runs.
SQuAD is kept out of every stage: it is the unseen domain on which the adapter's generalisation is measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "kvpacket_rag" / "adapters" / "smollm2-135m-instruct.safetensors"
CANDIDATES = ROOT / "benchmarks" / "adapter" / "candidates"
RUNS = ROOT / "runs" / "smollm2_default"
TEACHER = ROOT / "runs" / "teacher"


def _common(data: str, data_options: dict, max_chunks: int, samples: int, batch_size: int,
            answer_cap: int, seed: int = 1) -> list[str]:
    return [
        "--data", data, "--data-options", json.dumps(data_options, separators=(",", ":")),
        "--max-chunks", str(max_chunks), "--samples", str(samples), "--batch-size", str(batch_size),
        "--n-header", "8", "--n-trailer", "8", "--seed", str(seed), "--answer-cap", str(answer_cap),
        "--teacher-top-k", "256", "--checkpoint-every", "8", "--teacher-cache", str(TEACHER), "--resume",
    ]


FIRST = _common("biography:0.5,hotpotqa:0.375,niah:0.125", {"biography": {"docs_per_sample": [2, 3, 4, 5]}, "niah": {"n_chunks": 3, "chunk_words": 150}},
                max_chunks=6, samples=256, batch_size=4, answer_cap=48) + ["--threads", "1"]
PREAMBLE = _common("biography:0.4,hotpotqa:0.4,niah:0.2", {"biography": {"docs_per_sample": [2, 3, 4]}, "niah": {"n_chunks": 3, "chunk_words": 150}},
                   max_chunks=4, samples=384, batch_size=8, answer_cap=32) + ["--threads", "2", "--prefix", "preamble"]
LONG_NEEDLES = _common("biography:0.3,hotpotqa:0.3,niah:0.4", {"biography": {"docs_per_sample": [2, 3, 4]}, "niah": {"n_chunks": 4, "chunk_words": 300}},
                       max_chunks=4, samples=192, batch_size=8, answer_cap=32, seed=2) + ["--threads", "2", "--prefix", "preamble"]


def more_chunks(seed: int) -> list[str]:
    """Stage 7's mixture (3-5 biographies per sample, up to 6 chunks, needles of 4 x 300 words) over draw ``seed``."""
    return _common("biography:0.35,hotpotqa:0.35,niah:0.3", {"biography": {"docs_per_sample": [3, 4, 5]}, "niah": {"n_chunks": 4, "chunk_words": 300}},
                   max_chunks=6, samples=192, batch_size=8, answer_cap=32, seed=seed) + ["--threads", "2", "--prefix", "preamble"]


BUILD_LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-lr", "2e-3"]
LOW_LR_BUILD_LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lora-lr", "7e-4"]
FIRST_EXACT_CONTEXT_LOSS = ["--exact-first", "--context-tokens", "128", "--context-weight", "1"]


def stage(name: str, common: list[str], epochs: int, lr: str, out: Path, init: Path | None = None) -> list[str]:
    """Arguments of one stage, warm-started from ``init`` when given; checkpoints and logs in
    ``runs/smollm2_default/<name>.run``."""
    warm_start = ["--init-adapter", str(init)] if init is not None else []
    return [*common, "--epochs", str(epochs), "--lr", lr, *warm_start, "--run-dir", str(RUNS / f"{name}.run"),
            "--out", str(out)]


STAGE1, STAGE2, STAGE3, STAGE4, STAGE5, STAGE6, STAGE7, STAGE8, STAGE9, STAGE10 = (
    CANDIDATES / f"smollm2-135m-instruct-stage{n}.safetensors" for n in range(1, 11))
STAGES = [stage("stage1", FIRST, 2, "3e-2", STAGE1), stage("stage2", FIRST, 2, "1e-2", STAGE2, STAGE1),
          stage("stage3", FIRST, 2, "1e-2", STAGE3, STAGE2), stage("stage4", PREAMBLE, 2, "1e-2", STAGE4, STAGE3),
          stage("stage5", PREAMBLE, 1, "3e-3", STAGE5, STAGE4) + BUILD_LORA,
          stage("stage6", LONG_NEEDLES, 1, "3e-3", STAGE6, STAGE5) + BUILD_LORA,
          stage("stage7", more_chunks(3), 1, "3e-3", STAGE7, STAGE6) + BUILD_LORA,
          stage("stage8", more_chunks(4), 1, "1e-3", STAGE8, STAGE7) + LOW_LR_BUILD_LORA,
          stage("stage9", more_chunks(5), 1, "1e-3", STAGE9, STAGE8) + LOW_LR_BUILD_LORA,
          stage("stage10", more_chunks(6), 1, "1e-3", STAGE10, STAGE9) + LOW_LR_BUILD_LORA + FIRST_EXACT_CONTEXT_LOSS,
          stage("stage11", more_chunks(7), 1, "1e-3", OUT, STAGE10) + LOW_LR_BUILD_LORA + FIRST_EXACT_CONTEXT_LOSS
          + ["--kv-weight", "10"]]


def main(extra: list[str] | None = None) -> int:
    """Run the stages whose adapter is missing (``extra`` arguments are appended to each, e.g. ``["--no-progress"]``)."""
    from kvpacket_rag.cli import main as cli_main

    for arguments in STAGES:
        out = Path(arguments[arguments.index("--out") + 1])
        if out.is_file() and out != OUT:
            continue
        status = cli_main(["train", *arguments, *(extra or [])])
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
