"""`kvpacket train`: distil header/trailer adapters for a model; `kvpacket average-adapters`: average trained ones
(see `training`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapter import PREFIX_NONE, PREFIXES
from ..lora import ALL_TARGETS, DEFAULT_TARGETS
from ..prompt import DEFAULT_SYSTEM_PROMPT


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the header/trailer adapter of a model by distillation from full attention",
        description="Self-supervised distillation (no gold answers needed): the model with full attention teaches "
                    "the packet path. Writes OUT (safetensors) and its JSON card; checkpoints, log.json and loss.png "
                    "go to --run-dir.")
    parser.add_argument("--model", default=None, help="Hugging Face id or directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="biography:0.5,hotpotqa:0.5",
                        help="mixture NAME[:WEIGHT],... over biography, hotpotqa, niah, squad, jsonl:PATH (default: %(default)s)")
    parser.add_argument("--data-options", default=None, type=_json_object,
                        help='loader options per dataset as JSON, e.g. \'{"biography": {"docs_per_sample": [2, 3]}}\'')
    parser.add_argument("--max-chunks", type=int, default=None, help="keep only the first N chunks of each sample")
    parser.add_argument("--samples", type=int, default=256, help="training samples (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the samples (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="effective batch per optimizer step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate, linear decay to 0 (default: %(default)s)")
    parser.add_argument("--n-header", type=int, default=8, help="header soft tokens (default: %(default)s)")
    parser.add_argument("--n-trailer", type=int, default=8, help="trailer soft tokens (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="rank of build-time low-rank updates of the model, applied to chunks while packets are "
                             "built; the model that reads packets is unchanged (default: %(default)s, none)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="their scale numerator (default: %(default)s)")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="their peak learning rate (default: %(default)s)")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated layers they update, among {','.join(ALL_TARGETS)} (default: %(default)s)")
    parser.add_argument("--prefix", choices=PREFIXES, default=PREFIX_NONE,
                        help="build every packet after the chat preamble ('preamble') or from position 0 ('none', "
                             "the paper's layout) (default: %(default)s)")
    parser.add_argument("--init-adapter", type=Path, default=None,
                        help="start from this adapter file instead of a random initialisation (one with fewer soft tokens "
                             "than --n-header/--n-trailer is grown: new tokens before its header and after its trailer)")
    parser.add_argument("--exact-first", action="store_true",
                        help="train for the kv_packet_first_exact method: the first chunk of every sample is read "
                             "plain after the preamble, the others as packets")
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="also distil the first N tokens of each sample's last chunk, read as plain text after the "
                             "other chunks' packets (0: the answer only; default: %(default)s)")
    parser.add_argument("--context-weight", type=float, default=1.0,
                        help="weight of that per-token KL against the answer's (default: %(default)s)")
    parser.add_argument("--kv-weight", type=float, default=0.0,
                        help="weight of a loss on the packets' chunk keys/values against full recompute's in context "
                             "(0: off; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-cap", type=int, default=64, help="teacher answer tokens at most (default: %(default)s)")
    parser.add_argument("--teacher-top-k", type=int, default=None,
                        help="store the teacher's top-k log-probabilities plus the rest mass (default: full vocabulary)")
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message of the preamble")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory for long contexts, slower")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    parser.add_argument("--run-dir", type=Path, default=None, help="checkpoints and logs (default: OUT without suffix + .run)")
    parser.add_argument("--teacher-cache", type=Path, default=None, help="teacher output cache (default: user cache dir)")
    parser.add_argument("--stop-after-steps", type=int, default=None, help="end this session after N total steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    parser.set_defaults(handler=run_train)

    average = subparsers.add_parser(
        "average-adapters", help="write the element-wise mean of adapters trained from one starting point",
        description="Averages soft tokens and build-time low-rank factors of two or more adapters of one model with "
                    "the same sizes, prefix and low-rank layout (for example, continuations of one adapter over "
                    "different samples). Writes OUT (safetensors) and its JSON card.")
    average.add_argument("adapters", nargs="+", type=Path, help="adapter files (.safetensors), two or more")
    average.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    average.set_defaults(handler=run_average)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--data-options is not valid JSON ({error.msg})") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--data-options must be a JSON object of dataset name -> options")
    return value


def config_from_args(args: argparse.Namespace):
    """The `training.TrainConfig` of parsed ``kvpacket train`` arguments."""
    from kvpacket_rag.training import TrainConfig

    return TrainConfig(
        out=args.out, model=args.model, data=args.data, data_options=args.data_options or {},
        max_chunks=args.max_chunks, samples=args.samples, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, n_header=args.n_header, n_trailer=args.n_trailer, prefix=args.prefix,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_lr=args.lora_lr,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()), init_adapter=args.init_adapter,
        exact_first=args.exact_first, context_tokens=args.context_tokens, context_weight=args.context_weight,
        kv_weight=args.kv_weight,
        seed=args.seed, answer_cap=args.answer_cap,
        teacher_top_k=args.teacher_top_k, system_prompt=args.system_prompt,
        gradient_checkpointing=args.gradient_checkpointing, device=args.device, dtype=args.dtype,
        threads=args.threads, checkpoint_every=args.checkpoint_every, run_dir=args.run_dir,
        teacher_cache=args.teacher_cache, stop_after_steps=args.stop_after_steps, resume=args.resume,
        progress=not args.no_progress)


def run_train(args: argparse.Namespace) -> int:
    from kvpacket_rag.tuning import tune_malloc
    from kvpacket_rag.training import train

    tune_malloc()
    config = config_from_args(args)
    result = train(config)
    where = f"adapter written to {result.path}" if result.path else \
        f"stopped after step {result.steps} of {config.total_steps}; continue with --resume"
    print(f"{where}; steps {result.steps}, final loss {result.final_loss:.4f}, wall {result.wall_time_s:.0f} s, "
          f"log {config.run_dir / 'log.json'}", file=sys.stderr)
    return 0


def run_average(args: argparse.Namespace) -> int:
    from kvpacket_rag.adapter import PacketAdapter
    from kvpacket_rag.training.averaging import average_adapters

    adapter = average_adapters([PacketAdapter.load(path) for path in args.adapters])
    adapter.save(args.out)
    print(f"adapter written to {args.out}; fingerprint {adapter.fingerprint[:12]}, mean of {len(args.adapters)}",
          file=sys.stderr)
    return 0
