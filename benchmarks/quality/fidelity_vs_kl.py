"""Which KL a reuse method needs for a given fidelity: full recompute's cache blended with bare packets.

For each question, the context's keys and values are ``exact + a * (bare - exact)``: ``exact`` is full
recompute's own cache of ``preamble | chunks``, ``bare`` the same tokens as bare packets built after the chat
preamble (each chunk read alone, at the same positions). ``a = 0`` is full recompute and ``a = 1`` bare
packets; the values between give a family of approximations whose teacher-forced KL (per token, on the
full-recompute answer) and fidelity (token F1 of the greedy answer against full recompute's) can be read off
side by side. ``--adapters`` adds, on the same questions, the rows of trained packets (the product path:
packets of that adapter assembled after the preamble). Greedy answers of at most 24 tokens (the harness's
setting), float32 on CPU.

Example:
    python benchmarks/quality/fidelity_vs_kl.py --set biography:5:30 --blends 0 0.05 0.1 0.2 0.4 1 \\
        --threads 2 --json benchmarks/quality/fidelity_vs_kl.json
    python benchmarks/quality/fidelity_vs_kl.py --plot benchmarks/quality/fidelity_vs_kl.png \\
        benchmarks/quality/fidelity_vs_kl_biography.json benchmarks/quality/fidelity_vs_kl_hotpotqa.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvpacket_rag.adapter import resolve_adapter
from kvpacket_rag.benchmarks.common import machine_info
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.evaluation.plots import labelled_panels
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.kvcache import KVBuffer, PacketCache, assemble
from kvpacket_rag.metrics import best_f1
from kvpacket_rag.models import load_model
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.training import tokenize_sample
from kvpacket_rag.training.teacher import teacher_answer


def exact_block(model, context_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full recompute's keys/values ``[layers, kv_heads, T, head_dim]`` of ``context_ids``."""
    cache = PacketCache(KVBuffer(model), 0)
    model.model.model(input_ids=torch.tensor([context_ids]), position_ids=torch.arange(len(context_ids))[None],
                      cache=cache, use_cache=True)
    return cache.to_block()


def packet_block(model, builder, preamble_block, chunk_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The preamble and the chunks' packets (each built after its own preamble copy), assembled in order."""
    packets = builder.build_many([list(c) for c in chunk_ids])
    return assemble(KVBuffer(model), [preamble_block] + [(p.keys, p.values) for p in packets], model.rope).to_block()


def as_cache(keys: torch.Tensor, values: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(keys.shape[0]):
        cache.update(keys[layer][None].clone(), values[layer][None].clone(), layer)
    return cache


def greedy(model, keys, values, suffix_ids: list[int], cap: int, stop: set[int]) -> list[int]:
    """Greedy answer over a given context cache (question suffix first, then one token at a time)."""
    cache, position, tokens = as_cache(keys, values), keys.shape[2], []
    ids = list(suffix_ids)
    while True:
        positions = torch.arange(position, position + len(ids))[None]
        out = model.model(input_ids=torch.tensor([ids]), position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
        position += len(ids)
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token in stop or len(tokens) == cap:
            return tokens
        ids = [token]


def forced_logits(model, keys, values, tail_ids: list[int], n_logits: int) -> torch.Tensor:
    positions = torch.arange(keys.shape[2], keys.shape[2] + len(tail_ids))[None]
    return model.model(input_ids=torch.tensor([tail_ids]), position_ids=positions,
                       cache=as_cache(keys, values), use_cache=True, logits_to_keep=n_logits).logits[0]


def plot(results: list[Path], path: Path) -> Path:
    """Fidelity against KL (log scale), one panel per result file; full recompute itself (KL 0) is left out."""
    panels = {}
    for result in results:
        data = json.loads(result.read_text())
        points = [(f"a={key}" if key[0].isdigit() else "shipped" if key == "default" else key, row["kl"], row["fidelity"])
                  for key, row in data["blends"].items() if row["kl"] > 1e-6]
        panels[f"{data['set']} (seed {data['seed']})"] = points
    return labelled_panels(panels, "teacher-forced KL per token (log)", "fidelity (F1 vs full recompute)", path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="biography:5:30", help="NAME:DOCS:N (test split, seed --seed)")
    parser.add_argument("--blends", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.4, 1.0])
    parser.add_argument("--adapters", nargs="*", default=[], help="adapters whose packets are measured too")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="draw the result files named after it into PNG instead of measuring")
    parser.add_argument("results", type=Path, nargs="*", help="result files for --plot")
    args = parser.parse_args(argv)
    if args.plot is not None:
        print(plot(args.results, args.plot))
        return 0
    torch.set_num_threads(args.threads)
    model = load_model()
    formatter = PromptFormatter(model.tokenizer)
    builder = PacketBuilder(model, resolve_adapter(model, "none+preamble"), formatter)
    trained = {name: PacketBuilder(model, resolve_adapter(model, name), formatter) for name in args.adapters}
    preamble, stop = formatter.preamble_ids(), eos_ids(model.tokenizer, model.config)
    name, docs, n = args.set.split(":")
    samples = load_samples(name, "test", int(n), seed=args.seed, **({"docs_per_sample": int(docs)} if docs else {}))
    started = time.perf_counter()
    rows = {key: {"fidelity": [], "kl_sum": 0.0, "tokens": 0, "same": []} for key in [*args.blends, *args.adapters]}
    decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    with torch.no_grad():
        preamble_block = exact_block(model, preamble)
        for sample in samples:
            tokenized = tokenize_sample(sample, formatter, model, 0, args.max_new_tokens)
            context = tokenized.prompt_ids(preamble)[: -len(tokenized.suffix_ids)]
            reference = teacher_answer(model, tokenized.prompt_ids(preamble), args.max_new_tokens, stop)
            reference_text = decode(reference.answer_ids)
            exact = exact_block(model, context)
            bare = packet_block(model, builder, preamble_block, tokenized.chunk_ids)
            tail = list(tokenized.suffix_ids) + reference.answer_ids[:-1].tolist()
            for key, row in rows.items():
                if key in trained:
                    keys, values = packet_block(model, trained[key], preamble_block, tokenized.chunk_ids)
                else:
                    keys, values = (e + key * (b - e) for e, b in zip(exact, bare))
                text = decode(greedy(model, keys, values, tokenized.suffix_ids, args.max_new_tokens, stop))
                row["fidelity"].append(best_f1(text, [reference_text]))
                row["same"].append(text == reference_text)
                row["kl_sum"] += float(reference.kl(forced_logits(model, keys, values, tail, reference.length)).sum())
                row["tokens"] += reference.length
    table = {str(key): {"fidelity": statistics.mean(r["fidelity"]), "identical": statistics.mean(r["same"]),
                        "kl": r["kl_sum"] / r["tokens"], "n": len(r["fidelity"])} for key, r in rows.items()}
    print(f"{args.set}, test split seed {args.seed}\n| blend a or adapter | KL per token | fidelity | identical answers |\n"
          "|---|---|---|---|")
    for a, r in table.items():
        print(f"| {a} | {r['kl']:.4f} | {r['fidelity']:.3f} | {r['identical']:.2f} |")
    if args.json is not None:
        meta = machine_info(args.threads) | {"wall_s": round(time.perf_counter() - started, 1)}
        args.json.write_text(json.dumps(meta | {"set": args.set, "seed": args.seed,
                                                "max_new_tokens": args.max_new_tokens, "blends": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
