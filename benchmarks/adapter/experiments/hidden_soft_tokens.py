"""Probe: how much of an adapter's KL comes from the question reading the soft tokens themselves.

Teacher-forced KL per token (full-recompute answer, ≤ 32 tokens) of an adapter's packets, with the header and
trailer keys/values visible to the question (the product path) and hidden from it (the chunk's own keys and
values, still built after the header, are all the question reads of each packet), on biography questions with
1, 3 or 5 documents (test split, seed 1). Training-free; the block-mask forward stands for the packet path.

    python benchmarks/adapter/experiments/hidden_soft_tokens.py --docs 1 5 --n 30 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from kvpacket_rag.adapter import PREFIX_PREAMBLE, resolve_adapter
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.generation import eos_ids
from kvpacket_rag.models import load_model
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.reference import block_causal_mask, packed_layout
from kvpacket_rag.training import tokenize_sample
from kvpacket_rag.training.teacher import teacher_answer


def soft_token_spans(adapter, n_preamble: int, chunk_ids) -> list[tuple[int, int]]:
    """Sequence spans of every header and trailer in `packed_layout`'s order."""
    spans, offset = [], n_preamble
    for ids in chunk_ids:
        offset += n_preamble if adapter.prefix == PREFIX_PREAMBLE else 0
        spans.append((offset, offset + adapter.n_header))
        offset += adapter.n_header + len(ids)
        spans.append((offset, offset + adapter.n_trailer))
        offset += adapter.n_trailer
    return spans


@torch.no_grad()
def kl(model, adapter, preamble, tokenized, full, hide: bool) -> float:
    tail = list(tokenized.suffix_ids) + full.answer_ids[:-1].tolist()
    embeds, positions, mask, gate = packed_layout(model, adapter, preamble, tokenized.chunk_ids, tail)
    if hide:
        for first, end in soft_token_spans(adapter, len(preamble), tokenized.chunk_ids):
            mask[..., -len(tail):, first:end] = torch.finfo(mask.dtype).min
    with adapter.building(model, gate):
        logits = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             logits_to_keep=full.length).logits[0]
    return float(full.kl(logits).sum())


@torch.no_grad()
def kl_first_exact(model, adapter, preamble, tokenized, full) -> float:
    """KL when the first chunk is read as full recompute reads it (plain, right after the preamble) and the
    others as the adapter's packets (each after its own hidden preamble copy)."""
    tail = list(tokenized.suffix_ids) + full.answer_ids[:-1].tolist()
    embed = lambda ids: model.embed(torch.tensor(list(ids), dtype=torch.long))  # noqa: E731
    first = list(tokenized.chunk_ids[0])
    n_pre = len(preamble) + len(first)
    pieces, positions, blocks, hidden, gate = [embed(preamble + first)], [torch.arange(n_pre)], [n_pre], [], [torch.zeros(n_pre)]
    start = offset = n_pre
    for ids in tokenized.chunk_ids[1:]:
        block = adapter.wrap(embed(ids))
        pieces += [embed(preamble), block]
        positions += [torch.arange(start - len(preamble), start), torch.arange(start, start + block.shape[0])]
        hidden.append((offset, offset + len(preamble)))
        gate += [torch.zeros(len(preamble)), torch.ones(block.shape[0])]
        blocks.append(len(preamble) + block.shape[0])
        start += block.shape[0]
        offset += blocks[-1]
    pieces.append(embed(tail))
    positions.append(torch.arange(start, start + len(tail)))
    gate.append(torch.zeros(len(tail)))
    embeds = torch.cat(pieces)[None]
    mask = block_causal_mask(blocks, len(tail), embeds.dtype, embeds.device, hidden)
    with adapter.building(model, torch.cat(gate)[None, :, None]):
        logits = model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.cat(positions)[None],
                             logits_to_keep=full.length).logits[0]
    return float(full.kl(logits).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--docs", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    adapter = resolve_adapter(model, args.adapter)
    formatter = PromptFormatter(model.tokenizer)
    preamble, stop = formatter.preamble_ids(), eos_ids(model.tokenizer, model.config)
    print("| documents | n | soft tokens visible | soft tokens hidden | first chunk exact |\n|---|---|---|---|---|")
    for docs in args.docs:
        totals, tokens, first_exact = {False: 0.0, True: 0.0}, 0, 0.0
        for sample in load_samples("biography", "test", args.n, seed=1, docs_per_sample=docs):
            tokenized = tokenize_sample(sample, formatter, model, adapter.n_header + adapter.n_trailer, 32)
            full = teacher_answer(model, tokenized.prompt_ids(preamble), 32, stop)
            tokens += full.length
            for hide in totals:
                totals[hide] += kl(model, adapter, preamble, tokenized, full, hide)
            first_exact += kl_first_exact(model, adapter, preamble, tokenized, full)
        print(f"| {docs} | {args.n} | {totals[False] / tokens:.4f} | {totals[True] / tokens:.4f} "
              f"| {first_exact / tokens:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
