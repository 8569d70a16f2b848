"""Markdown tables of one evaluation result."""

from __future__ import annotations

from .harness import REFERENCE


def _num(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _adapter_text(adapter: dict) -> str:
    if adapter["n_header"] + adapter["n_trailer"] == 0:
        return "none (0+0)"
    tokens = f"{adapter['n_header']}+{adapter['n_trailer']} tokens"
    return f"{adapter['spec'] or 'given'} ({tokens}, {adapter['fingerprint'][:12]})"


def _machine_text(machine: dict) -> str:
    gpu = f", {machine['gpu']}" if machine.get("gpu") else ""
    return f"{machine['cpu']}, {machine['threads']} threads{gpu} · {machine['date']}"


def _packets_text(result: dict) -> str:
    quantization = result.get("quantization", "none")
    return "" if quantization == "none" else f" · {quantization} packets ({result['store']})"


def header(result: dict) -> str:
    """One paragraph: dataset, model, adapter, machine, threads, date and the exact command(s)."""
    model = result["model"]
    order = "" if result.get("order", "dataset") == "dataset" else f", chunks in {result['order']} order"
    first = (f"**{result['dataset']}** ({result['split']} split, {result['n']} questions, seed {result['seed']}"
             f"{order}, greedy, ≤ {result['max_new_tokens']} new tokens) · model {model['name']} ({model['dtype']}, "
             f"{model['device']}) · kv_packet adapter {_adapter_text(result['adapter'])}{_packets_text(result)} · "
             f"wall {result['wall_s'] / 60:.1f} min")
    sessions = result.get("sessions")
    if not sessions:
        return f"{first} · {_machine_text(result['machine'])}\n\n`{result['machine']['command']}`"
    lines = [first, "", "Measured in sessions (TTFT ratios are within a session; fidelity and KL share one reference):",
             ""]
    for number, session in enumerate(sessions):
        lines.append(f"{number}. {', '.join(session['methods'])} — {_machine_text(session['machine'])}, adapter "
                     f"{_adapter_text(session['adapter'])}: `{session['machine']['command']}`")
    return "\n".join(lines)


def quality_rows(result: dict) -> list[str]:
    """The main table: quality, fidelity, KL, TTFT and FLOPs per method."""
    methods = result["methods"]
    lines = [("| method | F1 | F1 / full | EM | recall | fidelity | agreement | KL (nats/token) | TTFT median | "
              "TTFT / full | context FLOPs | FLOPs / full |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {_num(m['f1'])} | {_num(m['f1_vs_full'], '.2f')} | {_num(m['em'])} | {_num(m['recall'])} | "
            f"{_num(m['fidelity'])} | {_num(m['agreement'], '.2f')} | {_num(m['kl'], '.4f')} | "
            f"{m['ttft_s'] * 1e3:.1f} ms | {_num(m['ttft_vs_full'], '.3f')} | {m['flops']:.2e} | "
            f"{_num(m['flops_vs_full'], '.1e')} |")
    return lines


def breakdown_rows(result: dict) -> list[str]:
    """TTFT breakdown (medians, ms), context size and memory per method."""
    lines = [("| method | packet load | assembly | context prefill | question prefill | TTFT | context tokens | "
              "KV cache | peak GPU memory |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        b = m["ttft_breakdown"]
        gpu = f"{m['peak_gpu_mb']:.0f} MiB" if m.get("peak_gpu_mb") is not None else "–"
        lines.append(f"| {name} | {b['packet_load_s'] * 1e3:.2f} | {b['assembly_s'] * 1e3:.2f} | "
                     f"{b['context_prefill_s'] * 1e3:.1f} | {b['question_prefill_s'] * 1e3:.1f} | "
                     f"{b['ttft_s'] * 1e3:.1f} | {m['context_tokens']:.0f} | {_num(m['kv_cache_mb'], '.1f')} MiB | {gpu} |")
    return lines


LEGEND = (f"F1: token F1 micro-averaged over questions (as in the KV Packet paper); fidelity: mean token F1 of the "
          f"method's answer against the {REFERENCE} answer; agreement: share of answers equal to it after "
          f"normalisation; KL: teacher-forced KL({REFERENCE} ‖ method) in nats per token along the {REFERENCE} "
          "answer (its stop decision included), on the very cache each method answered from; context FLOPs: analytic "
          "question-time FLOPs spent on the documents (key rotation + recomputed tokens), median per question, the "
          "question prefill (identical for every method) excluded; TTFT: median call-to-first-token with packets "
          "already built and stored (ingestion is offline), the first question answered once as a warm-up; CacheBlend "
          "and EPIC reuse the same bare packets and the same clock; KV cache: assembled context at the model's dtype.")


def markdown_table(result: dict) -> str:
    """Header, main table and breakdown of one result, with a legend."""
    return "\n".join([header(result), "", *quality_rows(result), "", "TTFT breakdown (median ms):", "",
                      *breakdown_rows(result), "", LEGEND])
