"""Quality of a trained adapter on held-out data: full recompute vs no recompute vs kv_packet.

For each question of each held-out set, the engine answers with every method (greedy, same cap). Scores:

- F1 (micro, as in the paper, and macro) and answer recall (gold contained in the answer) against the gold;
- fidelity: token F1 of the method's answer against the full-recompute answer;
- KL: teacher-forced KL(full ‖ method) per token on the full-recompute answer (its stop token included),
  the method's logits taken from the block-diagonal forward, which equals the packet path (tests prove it).

Writes JSON and a markdown table with the command, machine, threads and date. Per-sample records keep
ids and scores only (HotpotQA text is CC BY-SA and is not copied into the repository).

Example (the shipped adapter, 100 questions per set, 1 thread):
    python benchmarks/adapter/evaluate_adapter.py --n 100 --sets biography:5 biography:2 hotpotqa \\
        --threads 1 --json benchmarks/adapter/smollm2-135m-instruct.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.benchmarks.common import machine_info, split_first_exact, write_outputs
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.adapter import resolve_adapter
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.generation import GenerationConfig
from kvpacket_rag.metrics import aggregate, best_f1, token_f1
from kvpacket_rag.models import load_model
from kvpacket_rag.store import InMemoryStore
from kvpacket_rag.tuning import set_threads, tune_malloc
from kvpacket_rag.training import student_logits, tokenize_sample

METHODS = ("full_recompute", "no_recompute", "kv_packet")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model id/directory (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default="default", help="adapter file or 'default' (the shipped one)")
    parser.add_argument("--sets", nargs="+", default=["biography:5", "biography:2", "hotpotqa"],
                        help="held-out sets: biography:DOCS, hotpotqa, squad, niah (test split)")
    parser.add_argument("--n", type=int, default=100, help="questions per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/adapter/results.json", help="output JSON (.md beside it)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, full_recompute first")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/eval_cache"),
                        help="per-question results already measured (adapter-independent ones are reused)")
    parser.add_argument("--kl-only", nargs="+", default=None, metavar="ADAPTER",
                        help="only print teacher-forced KL per token of these adapters and no_recompute: files, 'none' or "
                             "'default', each optionally with '+preamble' (packets built after the chat preamble) and "
                             "then '@first-exact' (the first chunk read exactly, as kv_packet_first_exact does)")
    return parser.parse_args(argv)


def load_set(spec: str, n: int, seed: int):
    name, _, docs = spec.partition(":")
    options = {"docs_per_sample": int(docs)} if name == "biography" and docs else {}
    return load_samples(name, "test", n, seed=seed, **options)


@torch.no_grad()
def teacher_forced_kl(engine: PacketEngine, adapters: dict[str, PacketAdapter], sample, answer_ids: list[int]) -> dict:
    """Summed KL(full ‖ method) over the answer tokens, per method key."""
    model, formatter = engine.model, engine.formatter
    extra = max(a.n_header + a.n_trailer for a in adapters.values())
    tokenized = tokenize_sample(sample, formatter, model, extra, len(answer_ids))
    preamble = formatter.preamble_ids()
    answer = torch.tensor(answer_ids, dtype=torch.long)
    prompt = tokenized.prompt_ids(preamble) + answer_ids[:-1]
    full = model.model(input_ids=torch.tensor([prompt], device=model.device), logits_to_keep=len(answer_ids)).logits[0]
    full = torch.log_softmax(full.float(), -1)
    result = {}
    for key, adapter in adapters.items():
        logits = torch.log_softmax(student_logits(model, adapter, preamble, tokenized, answer).float(), -1)
        result[key] = float((full.exp() * (full - logits)).sum())
    return result


class RecordCache:
    """Per-question answers and KL sums already measured, in a JSON file under ``runs/`` (git-ignored).

    Full recompute and no recompute do not depend on the adapter, so they are measured once; kv_packet
    entries are keyed by the adapter fingerprint.
    """

    def __init__(self, directory: Path, model, spec: str, seed: int, max_new_tokens: int):
        name = f"{model.fingerprint[:12]}-{spec.replace(':', '_')}-seed{seed}-cap{max_new_tokens}.json"
        self.path = directory / name
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, sample_id: str) -> dict:
        return self.records.setdefault(sample_id, {"answers": {}, "kl": {}})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records))
        tmp.replace(self.path)


def method_key(method: str, adapter: PacketAdapter) -> str:
    return f"kv_packet@{adapter.fingerprint[:16]}" if method == "kv_packet" else method


def evaluate_set(engine: PacketEngine, spec: str, n: int, seed: int, max_new_tokens: int, methods: list[str],
                 cache_dir: Path) -> dict:
    samples = load_set(spec, n, seed)
    adapters = {"no_recompute": PacketAdapter.empty(engine.model), "kv_packet": engine.adapter}
    generation = GenerationConfig(max_new_tokens=max_new_tokens)
    eos = engine.model.tokenizer.eos_token_id
    cache = RecordCache(cache_dir, engine.model, spec, seed, max_new_tokens)
    records = []
    for sample in tqdm(samples, desc=spec, unit="q"):
        entry = cache.get(sample.id)
        for method in methods:
            key = method_key(method, engine.adapter)
            if key not in entry["answers"]:
                answer = engine.answer(sample.question, sample.chunks, method=method, generation=generation)
                entry["answers"][key] = answer.text
                if method == "full_recompute":
                    full_ids = list(answer.token_ids)
                    if len(full_ids) < max_new_tokens:
                        full_ids.append(eos)  # it stopped: the stop token is part of what a method must reproduce
                    entry["full_ids"] = full_ids
        missing = {method_key(m, engine.adapter): adapters[m] for m in methods
                   if m in adapters and method_key(m, engine.adapter) not in entry["kl"]}
        if missing:
            entry["kl"].update(teacher_forced_kl(engine, missing, sample, entry["full_ids"]))
        cache.save()
        engine.store = InMemoryStore()  # packets of ~5 MB each: do not keep them across questions
        records.append({"id": sample.id, "gold": list(sample.answers), "kl_tokens": len(entry["full_ids"]),
                        **{m: {"answer": entry["answers"][method_key(m, engine.adapter)],
                               "kl_sum": entry["kl"].get(method_key(m, engine.adapter), 0.0)} for m in methods}})
    return summarize(spec, records, methods)


def summarize(spec: str, records: list[dict], methods: list[str]) -> dict:
    tokens = sum(r["kl_tokens"] for r in records)
    scores = {}
    for m in methods:
        scores[m] = aggregate((r[m]["answer"], r["gold"]) for r in records)
        scores[m]["fidelity"] = sum(token_f1(r[m]["answer"], r["full_recompute"]["answer"]) for r in records) / len(records)
        scores[m]["kl_per_token"] = sum(r[m]["kl_sum"] for r in records) / tokens
    full_f1 = scores["full_recompute"]["micro_f1"]
    for m in methods:
        scores[m]["f1_ratio_to_full"] = scores[m]["micro_f1"] / full_f1 if full_f1 else None
    ratio = None
    if {"kv_packet", "no_recompute"} <= set(methods) and scores["no_recompute"]["kl_per_token"]:
        ratio = scores["kv_packet"]["kl_per_token"] / scores["no_recompute"]["kl_per_token"]
    keep_text = spec.startswith("biography")  # synthetic data of our own; other sets keep ids and scores only
    per_sample = [{"id": r["id"], **{m: {"f1_to_gold": best_f1(r[m]["answer"], r["gold"]),
                                         "fidelity": token_f1(r[m]["answer"], r["full_recompute"]["answer"]),
                                         "kl_per_token": r[m]["kl_sum"] / r["kl_tokens"],
                                         **({"answer": r[m]["answer"]} if keep_text else {})} for m in methods}}
                  for r in records]
    return {"set": spec, "n": len(records), "answer_tokens": tokens, "methods": scores,
            "kl_ratio_kv_packet_to_no_recompute": ratio, "samples": per_sample}


@torch.no_grad()
def kl_only(model, adapter_paths: list[str], specs: list[str], n: int, seed: int, max_new_tokens: int) -> str:
    """A cheap comparison of adapters (e.g. checkpoints): teacher-forced KL per token only, no answers generated;
    per set, also how many questions each adapter reads with a lower KL than the first one named."""
    from kvpacket_rag.generation import eos_ids
    from kvpacket_rag.prompt import PromptFormatter
    from kvpacket_rag.training import teacher_answer

    formatter = PromptFormatter(model.tokenizer)
    adapters = {"no_recompute": (PacketAdapter.empty(model), False)}
    for spec in adapter_paths:
        path, exact_first = split_first_exact(spec)
        adapters[spec] = resolve_adapter(model, path), exact_first
    lines = ["| set | n | " + " | ".join(adapters) + " |", "|---|---|" + "---|" * len(adapters)]
    first = adapter_paths[0]
    for spec in specs:
        totals, tokens, lower = dict.fromkeys(adapters, 0.0), 0, dict.fromkeys(adapters, 0)
        for sample in tqdm(load_set(spec, n, seed), desc=spec, unit="q"):
            tokenized = tokenize_sample(sample, formatter, model, 16, max_new_tokens)
            prompt = tokenized.prompt_ids(formatter.preamble_ids())
            teacher = teacher_answer(model, prompt, max_new_tokens, eos_ids(model.tokenizer, model.config))
            tokens += teacher.length
            question = {}
            for name, (adapter, exact_first) in adapters.items():
                logits = student_logits(model, adapter, formatter.preamble_ids(), tokenized, teacher.answer_ids,
                                        exact_first=exact_first)
                question[name] = float(teacher.kl(logits).sum())
                totals[name] += question[name]
            for name in adapters:
                lower[name] += question[name] < question[first]
        lines.append(f"| {spec} | {n} | " + " | ".join(f"{totals[a] / tokens:.4f}" for a in adapters) + " |")
        lines.append(f"| {spec}: questions with a lower KL than {first} | {n} | "
                     + " | ".join(str(lower[a]) for a in adapters) + " |")
        print("\n".join(lines[-2:]), flush=True)
    return "\n".join(lines)


def table(result: dict) -> str:
    machine = result["machine"]
    lines = [f"Adapter quality on held-out data: {result['model']} (float32, cpu), adapter {result['adapter']} "
             f"({result['adapter_fingerprint'][:12]}), {machine['threads']} thread(s), {machine['cpu']}, "
             f"{machine['date']}, {result['wall_s']:.0f} s", "",
             f"command: `{machine['command']}`", "",
             "| set | n | method | F1 (micro) | F1 / full | macro F1 | answer recall | fidelity | KL(full‖method)/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in result["sets"]:
        for m in run["methods"]:
            s = run["methods"][m]
            ratio = "" if s["f1_ratio_to_full"] is None else f"{s['f1_ratio_to_full']:.2f}"
            lines.append(f"| {run['set']} | {run['n']} | {m} | {s['micro_f1']:.3f} | {ratio} | {s['macro_f1']:.3f} | "
                         f"{s['answer_recall']:.3f} | {s['fidelity']:.3f} | {s['kl_per_token']:.4f} |")
    ratios = [f"{run['set']} {run['kl_ratio_kv_packet_to_no_recompute']:.3f}" for run in result["sets"]
              if run["kl_ratio_kv_packet_to_no_recompute"] is not None]
    lines += ["", "KL ratio kv_packet / no_recompute: " + ", ".join(ratios)] if ratios else []
    lines += ["", "Greedy decoding, at most " + str(result["max_new_tokens"]) + " new tokens, test splits (biography: "
              "test people, DOCS documents per question; HotpotQA: held-out half, 10 paragraphs). Per-question "
              "results are cached under --cache-dir and reused across runs (full and no recompute do not depend on "
              "the adapter)."]
    lines += ["", "Targets: kv_packet fidelity >= 0.85 and KL <= 0.2 x no_recompute's. Fidelity is token F1 of the "
              "answer against the full-recompute answer; KL is teacher-forced on the full-recompute answer."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_malloc()
    threads = set_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    if args.kl_only:
        print(kl_only(model, args.kl_only, args.sets, args.n, args.seed, args.max_new_tokens))
        return 0
    adapter = resolve_adapter(model, args.adapter)
    engine = PacketEngine(model, adapter=adapter)
    methods = args.methods.split(",")
    if methods[0] != "full_recompute" or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods must start with full_recompute and use only {', '.join(METHODS)}")
    sets = [evaluate_set(engine, spec, args.n, args.seed, args.max_new_tokens, methods, args.cache_dir)
            for spec in args.sets]
    machine = machine_info(threads)
    machine["command"] = " ".join(["python", *sys.argv])
    result = {"model": model.name, "adapter": str(args.adapter), "adapter_fingerprint": adapter.fingerprint,
              "adapter_card": adapter.card, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
              "machine": machine, "wall_s": time.perf_counter() - start, "sets": sets}
    write_outputs(result, table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
