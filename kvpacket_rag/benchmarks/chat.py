"""`kvpacket bench chat`: the cost of each turn of one conversation, with and without a chat session.

One conversation about one entity of the bundled corpus: the chunks are retrieved (MiniLM + FAISS) for the
first question and kept for the whole conversation. Each turn is answered twice on the same engine and clock:

- ``session``: through a `kvpacket_rag.session.ChatSession`, which keeps the conversation's cache, so a turn
  forwards only its new message and the template tokens around it;
- ``no_reuse``: `PacketEngine.answer` with the conversation as history, which assembles the packets and forwards
  the whole conversation every turn.

Both paths see the same conversation (the session's answers, greedy); ``same_answers`` records that the two
paths answered every turn alike. TTFT runs from the engine call to the first token (medians over ``--repeats``
conversations after one warm-up conversation); ``forwarded_tokens`` are the tokens pushed through the model
before the first token. ``session_bytes`` is the size of the session's kept key/value cache after the turn.
"""

from __future__ import annotations

import argparse
import os

from ..engine import PacketEngine
from ..generation import GenerationConfig
from ..prompt import ChatTurn
from ..store import InMemoryStore
from ..tuning import set_threads, tune_malloc
from .common import engine_header, median, peak_rss_mb, write_outputs

QUESTIONS = ("Who is the coach of Kaito Brennan?", "Where was Kaito Brennan born?", "In which year was he born?",
             "Which marathon did Kaito Brennan win?", "When did he win it?", "What sport does Kaito Brennan do?",
             "Who coaches him?", "What else do you know about Kaito Brennan?")
"""The conversation, one question per turn (about one document of the bundled corpus)."""

GOAL_RATIO = 1.2
"""Goal: the last turn forwards at most this many times the tokens of the first, and its TTFT is at most this many
times the first turn's."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--turns", type=int, default=6, help=f"turns of the conversation (1 to {len(QUESTIONS)})")
    parser.add_argument("--repeats", type=int, default=3, help="timed conversations per path (median reported)")
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved for the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length bound per turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--json", default=None, help="write the result here (and a .md table beside it)")


def retrieve(engine: PacketEngine, top_k: int) -> list[str]:
    """The chunks of the bundled corpus retrieved for the first question (their packets built and stored)."""
    from ..demo import load_corpus, quiet_embedder
    from ..index import PacketIndex

    index = PacketIndex(engine, quiet_embedder())
    index.add_documents(load_corpus())
    return [hit.text for hit in index.search(QUESTIONS[0], top_k)]


def session_conversation(engine: PacketEngine, chunks: list[str], turns: int, generation: GenerationConfig):
    """One conversation through a new chat session: per-turn rows and the answers."""
    session = engine.session()
    rows = []
    for question in QUESTIONS[:turns]:
        answer = session.answer(question, chunks, generation=generation)
        rows.append({"ttft_s": answer.timings["ttft_s"], "forwarded_tokens": answer.forwarded_tokens,
                     "context_tokens": answer.context_tokens,
                     "session_bytes": engine.sessions.state(session.id).nbytes, "text": answer.text})
    engine.sessions.drop(session.id)
    return rows, session.history


def plain_conversation(engine: PacketEngine, chunks: list[str], history: list[ChatTurn], generation: GenerationConfig):
    """The same conversation without reuse: every turn assembles the packets and forwards the whole history."""
    rows = []
    for n, turn in enumerate(history):
        answer = engine.answer(turn.user, chunks, history=history[:n], generation=generation)
        rows.append({"ttft_s": answer.timings["ttft_s"], "forwarded_tokens": answer.forwarded_tokens,
                     "context_tokens": answer.context_tokens, "text": answer.text})
    return rows


def summarize(runs: list[list[dict]], questions: tuple[str, ...]) -> list[dict]:
    """Per turn: median TTFT over the runs, the runs' TTFTs, and the token counts (identical across runs)."""
    out = []
    for n, question in enumerate(questions):
        cells = [run[n] for run in runs]
        row = {"turn": n + 1, "question": question, "ttft_s": median([c["ttft_s"] for c in cells]),
               "ttft_runs_s": [c["ttft_s"] for c in cells], "forwarded_tokens": cells[-1]["forwarded_tokens"],
               "context_tokens": cells[-1]["context_tokens"]}
        if "session_bytes" in cells[-1]:
            row["session_bytes"] = max(c["session_bytes"] for c in cells)
        out.append(row)
    return out


def ratios(turns: list[dict]) -> dict:
    """Last turn over first: forwarded tokens and TTFT."""
    first, last = turns[0], turns[-1]
    return {"forwarded_tokens": last["forwarded_tokens"] / first["forwarded_tokens"],
            "ttft": last["ttft_s"] / first["ttft_s"]}


def table(result: dict) -> str:
    machine, config = result["machine"], result["config"]
    session, plain = result["turns"], result["no_reuse"]["turns"]
    lines = [f"Chat turns, {result['model']} ({result['dtype']}, {result['device']}), {machine['threads']} threads, "
             f"{machine['cpu']}, {machine['date']}",
             f"command: `{machine['command']}`",
             f"one conversation of {config['turns']} turns over the {config['top_k']} chunks of the bundled corpus "
             f"retrieved for its first question ({result['context_tokens']} positions of preamble and packets); "
             f"answers of at most {config['max_new_tokens']} tokens, greedy; median of {config['repeats']} "
             f"conversations after one warm-up; load average (1 min) at start / end "
             f"{result['load_average'][0]:.1f} / {result['load_average'][1]:.1f}", "",
             "| turn | forwarded: session | forwarded: no reuse | TTFT: session | TTFT: no reuse | "
             "session KV cache |", "|---|---|---|---|---|---|"]
    for mine, theirs in zip(session, plain):
        lines.append(f"| {mine['turn']} | {mine['forwarded_tokens']} | {theirs['forwarded_tokens']} | "
                     f"{_ms(mine['ttft_s'])} | {_ms(theirs['ttft_s'])} | {mine['session_bytes'] / 2**20:.1f} MiB |")
    goals, mine, theirs = result["goals"], result["ratios"]["session"], result["ratios"]["no_reuse"]
    lines += ["", f"Turn {config['turns']} over turn 1, session: forwarded tokens {mine['forwarded_tokens']:.2f}×, "
              f"TTFT {mine['ttft']:.2f}× (goals ≤ {GOAL_RATIO}×: "
              f"{'met' if goals['forwarded_tokens_met'] else 'missed'}, {'met' if goals['ttft_met'] else 'missed'}); "
              f"no reuse: forwarded tokens {theirs['forwarded_tokens']:.2f}×, TTFT {theirs['ttft']:.2f}×.",
              f"Peak KV cache kept per session: {result['session_peak_bytes'] / 2**20:.1f} MiB "
              f"({result['session_peak_bytes'] / result['session_peak_positions'] / 1024:.0f} KiB per position "
              f"of capacity). Same answers on both paths: {'yes' if result['same_answers'] else 'no'}."]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def run(args: argparse.Namespace) -> dict:
    if not 1 <= args.turns <= len(QUESTIONS):
        raise ValueError(f"--turns must be between 1 and {len(QUESTIONS)}, got {args.turns}")
    if args.repeats < 1 or args.top_k < 1:
        raise ValueError("--repeats and --top-k must be >= 1")
    tune_malloc()
    threads = set_threads(args.threads)
    load_start = os.getloadavg()[0]
    engine = PacketEngine(args.model, adapter=None if args.adapter == "none" else args.adapter,
                          store=InMemoryStore(), device=args.device, dtype=args.dtype)
    chunks = retrieve(engine, args.top_k)
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    engine.preamble_block()
    _, history = session_conversation(engine, chunks, args.turns, generation)  # warm-up; fixes the conversation
    plain_conversation(engine, chunks, history, generation)
    session_runs, plain_runs = [], []
    for _ in range(args.repeats):
        session_runs.append(session_conversation(engine, chunks, args.turns, generation)[0])
        plain_runs.append(plain_conversation(engine, chunks, history, generation))
    session, plain = summarize(session_runs, QUESTIONS[: args.turns]), summarize(plain_runs, QUESTIONS[: args.turns])
    mine, theirs = ratios(session), ratios(plain)
    peak = max(session, key=lambda row: row["session_bytes"])
    result = {**engine_header(engine, threads),
              "config": {"turns": args.turns, "repeats": args.repeats, "top_k": args.top_k,
                         "max_new_tokens": args.max_new_tokens},
              "chunks": chunks, "context_tokens": session[0]["context_tokens"],
              "answers": [turn.assistant for turn in history],
              "turns": session, "no_reuse": {"turns": plain},
              "ratios": {"session": mine, "no_reuse": theirs},
              "goals": {"ratio": GOAL_RATIO, "forwarded_tokens_met": mine["forwarded_tokens"] <= GOAL_RATIO,
                        "ttft_met": mine["ttft"] <= GOAL_RATIO},
              "session_peak_bytes": peak["session_bytes"],
              "session_peak_positions": peak["session_bytes"] // engine.model.kv_bytes_per_position,
              "same_answers": all(run[n]["text"] == turn.assistant for runs in (session_runs, plain_runs)
                                  for run in runs for n, turn in enumerate(history)),
              "peak_rss_mb": peak_rss_mb(), "load_average": [load_start, os.getloadavg()[0]]}
    write_outputs(result, table(result), args.json)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    run(parser.parse_args())
