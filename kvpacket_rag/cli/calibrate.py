"""`kvpacket calibrate`: an adapter whose packets are averaged over calibration contexts drawn from a corpus."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="average packets over contexts drawn from a corpus",
        description="Draw --contexts sequences of --depth passages from a corpus and write an adapter (the given "
                    "one, by default bare packets after the chat preamble) whose packets are built after each "
                    "sequence and averaged. Draw from the corpus you serve: another domain's passages hurt.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="passages of a dataset split: biography, hotpotqa, niah, squad or a .jsonl file")
    source.add_argument("--corpus", help="a directory of documents (as the demo reads), chunked like ingestion")
    parser.add_argument("--split", default="train", choices=("train", "test"),
                        help="the dataset split to draw passages from (default train; keep evaluation passages out)")
    parser.add_argument("--n", type=int, default=200, help="dataset samples whose passages form the pool (default 200)")
    parser.add_argument("--chunk-tokens", type=int, default=200, help="chunk size for --corpus (default 200)")
    parser.add_argument("--contexts", type=int, default=4, help="contexts per packet (default 4)")
    parser.add_argument("--depth", type=int, default=2, help="passages per context (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="adapter file to write (safetensors, with a JSON card)")
    parser.add_argument("--model", default=None, help="Hugging Face id or directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default="none+preamble",
                        help="adapter to calibrate: a file, 'default' or 'none+preamble' (bare packets; the default)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..adapter import PREFIX_PREAMBLE, resolve_adapter
    from ..calibration import CalibrationConfig, calibrate
    from ..models import load_model
    from ..prompt import PromptFormatter

    config = CalibrationConfig(contexts=args.contexts, depth=args.depth, seed=args.seed)
    model = load_model(args.model)
    adapter = resolve_adapter(model, args.adapter)
    if adapter.prefix != PREFIX_PREAMBLE:
        adapter = adapter.with_prefix(PREFIX_PREAMBLE)
    passages, source = _passages(args, model.tokenizer)
    calibrated = calibrate(adapter, PromptFormatter(model.tokenizer), passages, config, source)
    path = calibrated.save(args.out)
    print(f"wrote {path} (fingerprint {calibrated.fingerprint[:12]}): {config.contexts} contexts of {config.depth} "
          f"passages from {len(passages)} passages of {source}")
    return 0


def _passages(args: argparse.Namespace, tokenizer) -> tuple[list[str], str]:
    if args.dataset:
        from ..datasets import load_samples

        samples = load_samples(args.dataset, args.split, args.n, seed=args.seed)
        return list(dict.fromkeys(chunk for sample in samples for chunk in sample.chunks)), \
            f"{args.dataset} ({args.split}, {len(samples)} samples, seed {args.seed})"
    from ..chunker import Chunker
    from ..demo import load_corpus

    chunker = Chunker(tokenizer, chunk_tokens=args.chunk_tokens)
    documents = load_corpus(args.corpus)
    return [chunk.text for doc in documents for chunk in chunker.split(doc.text)], f"corpus {args.corpus}"
