"""`kvpacket demo`: a RAG chatbot over the bundled corpus, answered through KV packets.

Interactive when stdin is a terminal; otherwise (pipes, CI) it answers the suggested questions and exits.
``--question`` answers once and exits; ``--compare`` adds the full-recompute answer and its TTFT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..generation import GenerationConfig
from ..rag import PACKET_READINGS
from .common import add_calibration_arguments, add_model_arguments, calibration_config

EXIT_WORDS = {"exit", "quit", ":q"}


def register(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="chat with a RAG bot over a bundled corpus, answered through KV packets",
        description="Ingests the bundled corpus (36 documents about fictional companies and people) into a packet "
                    "index under the cache directory (reused on the next run), then chats. Type 'exit' or press "
                    "Ctrl-D to leave, 'reset' to forget the conversation.")
    demo.add_argument("--question", "-q", action="append", default=None,
                      help="answer this question and exit (repeat for several; no chat history between them)")
    demo.add_argument("--compare", action="store_true",
                      help="also answer by full recompute of the same documents and show both TTFTs")
    demo.add_argument("--method", choices=PACKET_READINGS, default=None,
                      help="how packets are read: kv_packet_first_exact (default: the first retrieved document from "
                           "its exact packet, the others from adapter packets) or kv_packet (adapter packets only)")
    demo.add_argument("--top-k", type=int, default=3, help="documents retrieved per question (default 3)")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit in tokens (default 48)")
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="where the demo keeps its index and packets (default: $KVPACKET_CACHE/demo or "
                           "~/.cache/kvpacket-rag/demo)")
    demo.add_argument("--corpus", type=Path, default=None,
                      help="a directory of .txt documents to chat over instead of the bundled corpus")
    demo.add_argument("--json", action="store_true",
                      help="print one JSON object (ingestion summary and answers) instead of the chat transcript")
    add_model_arguments(demo)
    add_calibration_arguments(demo, "the corpus's chunks (kept as an index of its own)", "--top-k minus 1")
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .. import demo as core
    from ..tuning import set_threads

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)  # bad values fail before any loading
    calibration = calibration_config(args, places=args.top_k)
    set_threads(args.threads)
    root = args.cache_dir if args.cache_dir is not None else core.demo_dir()
    corpus_dir = args.corpus if args.corpus is not None else core.CORPUS_DIR
    corpus = core.load_corpus(corpus_dir)
    engine = core.make_demo_engine(args.model, args.adapter, root / "packets", args.device, args.dtype)
    index, summary = core.open_demo_index(engine, corpus, root, progress=not args.json, calibration=calibration)
    print(f"kvpacket demo: {_summary_line(summary)}", file=sys.stderr, flush=True)
    chat = core.DemoChat(index, top_k=args.top_k, generation=generation, method=args.method)
    suggested = core.suggested_questions(corpus_dir)

    if args.question:
        questions = args.question
    elif sys.stdin.isatty() and not args.json:
        return _interactive(chat, suggested, args.compare)
    else:
        questions = [q.question for q in suggested]
        if not questions:
            raise ValueError(f"{corpus_dir} has no suggested questions; pass --question")
        print("kvpacket demo: stdin is not a terminal; answering the suggested questions", file=sys.stderr)

    replies = []
    for question in questions:
        chat.reset()  # one-shot questions are independent
        if args.json:
            replies.append(chat.ask(question, compare=args.compare).to_dict())
        else:
            print(f"\nYou: {question}")
            _print_reply(chat, question, args.compare)
    if args.json:
        print(json.dumps({"ingest": summary.to_dict(), "answers": replies}, indent=2))
    return 0


def _summary_line(summary) -> str:
    origin = "reopened the saved index" if summary.reopened else "built a new index"
    return (f"{origin} in {summary.index_dir} ({summary.documents} documents, {summary.chunks} chunks); "
            f"packets: {summary.packets_built} built, {summary.packets_reused} reused from the store "
            f"({summary.seconds:.1f} s)")


def _interactive(chat, suggested, compare: bool) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("\nAsk about the fictional companies and people of the bundled corpus. Try:")
    for q in suggested:
        print(f"  - {q.question}")
    print("Type 'exit' or press Ctrl-D to leave, 'reset' to start a new conversation.")
    while True:
        try:
            question = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not question:
            continue
        if question.lower() in EXIT_WORDS:
            return 0
        if question.lower() == "reset":
            chat.reset()
            print("(conversation cleared)")
            continue
        try:
            _print_reply(chat, question, compare)
        except KeyboardInterrupt:
            print("\n(answer interrupted)")


def _print_reply(chat, question: str, compare: bool) -> None:
    """Stream the packet answer (and the full-recompute one), then sources and timings."""
    current = {"method": None}

    def on_piece(method: str, piece: str) -> None:
        if current["method"] != method:
            label = "Bot (KV packets)" if method in PACKET_READINGS else "Full recompute "
            print(f"{'' if current['method'] is None else chr(10)}{label}: ", end="")
            current["method"] = method
        print(piece, end="", flush=True)

    reply = chat.ask(question, compare=compare, on_piece=on_piece)
    if current["method"] is None:
        print("Bot (KV packets): ", end="")
    print()
    sources = "  ".join(f"[{n}] {hit.chunk.doc_id} ({hit.score:.2f})" for n, hit in enumerate(reply.sources, 1))
    print(f"  sources: {sources}")
    packet = reply.packet
    asked = ("the new message; the conversation came from the session's cache" if reply.conversation_cached
             else "question and chat history" if reply.history_turns else "the question only")
    label = packet.answer.method + ":"
    print(f"  {label:<15} TTFT {_ms(packet.timings['ttft_s'])} through {len(packet.packet_keys)} packets "
          f"({packet.answer.forwarded_tokens} tokens forwarded: {asked}; retrieval {_ms(reply.retrieval_s)})")
    if reply.full is not None:
        full = reply.full
        speedup = full.timings["ttft_s"] / max(packet.timings["ttft_s"], 1e-9)
        print(f"  full_recompute: TTFT {_ms(full.timings['ttft_s'])} ({full.answer.forwarded_tokens} tokens "
              f"forwarded: documents too) -> packets {speedup:.1f}x faster to first token")
        agree = "same answer" if full.text.strip() == packet.text.strip() else "answers differ"
        print(f"  {agree}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"
