"""The demo chatbot: a RAG chat over the bundled corpus, answered through KV packets.

The bundled corpus (``kvpacket_rag/data/corpus/``) is 36 short documents about fictional companies and
people, with suggested questions the embedded 135M model answers correctly. `open_demo_index` ingests it
into a `PacketIndex` whose packets live in a `LocalStore` under the demo directory; the next run opens the
saved index and reuses every packet (none is rebuilt). `DemoChat` answers questions with history, through
packets in a chat session (each turn forwards only its new message while the retrieved chunks stay the same), and
optionally by full recompute over the same retrieved chunks for comparison.

Example:
    >>> engine = make_demo_engine()
    >>> index, summary = open_demo_index(engine)          # builds packets on the first run only
    >>> chat = DemoChat(index, top_k=3)
    >>> reply = chat.ask("Who is the coach of Kaito Brennan?", compare=True)
    >>> reply.packet.text, reply.source_ids, reply.packet.timings["ttft_s"], reply.full.timings["ttft_s"]

The command line front end is ``kvpacket demo`` (`kvpacket_rag.cli.demo`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .calibration import CalibrationConfig
from .errors import KVPacketError
from .generation import GenerationConfig
from .index import Document, PacketIndex, RAGAnswer, SearchHit, stream_answer
from .models import DEFAULT_MODEL, cache_dir
from .prompt import ChatTurn
from .rag import PACKET_READINGS

CORPUS_DIR = Path(__file__).resolve().parent / "data" / "corpus"
QUESTIONS_FILE = "questions.json"


def demo_dir() -> Path:
    """Where the demo keeps its index and packets by default: ``cache_dir() / "demo"``."""
    return cache_dir() / "demo"


@dataclass(frozen=True)
class SuggestedQuestion:
    """A question the default model answers correctly over the bundled corpus.

    Attributes:
        question: the question text.
        answer: a substring of any correct reply (case-insensitive).
        source: ``doc_id`` of the document holding the answer (its file name).
    """

    question: str
    answer: str
    source: str


def load_corpus(directory: str | Path = CORPUS_DIR) -> list[Document]:
    """The ``.txt`` documents of ``directory``, sorted by name; ``doc_id`` is the file name.

    Raises:
        FileNotFoundError: the directory holds no non-empty ``.txt`` file.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.txt"))
    docs = [Document(f.read_text(encoding="utf-8").strip(), doc_id=f.name, metadata={"title": _title(f)})
            for f in files]
    docs = [doc for doc in docs if doc.text]
    if not docs:
        raise FileNotFoundError(f"{directory} holds no non-empty .txt documents; pass a directory of text files")
    return docs


def _title(path: Path) -> str:
    return " ".join(word.capitalize() for word in path.stem.split("_"))


def suggested_questions(directory: str | Path = CORPUS_DIR) -> list[SuggestedQuestion]:
    """The suggested questions of a corpus directory (from its ``questions.json``; empty when absent)."""
    path = Path(directory) / QUESTIONS_FILE
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [SuggestedQuestion(q["question"], q["answer"], q["source"] + ".txt") for q in data["questions"]]


# ---- engine and index --------------------------------------------------------------------------------------------


def make_demo_engine(model: str | None = None, adapter: str | None = "default", store_dir: str | Path | None = None,
                     device: str = "cpu", dtype: str | None = None, log: Callable[[str], None] | None = None):
    """A `PacketEngine` whose packets live in a `LocalStore` (default: ``demo_dir() / "packets"``).

    ``adapter="default"`` takes the shipped adapter of the model when there is one and falls back to bare
    packets (no adapter, lower quality) with a note otherwise; ``None``/``"none"`` means bare packets; any other
    value is an adapter file.
    """
    from .adapter import shipped_adapter
    from .engine import PacketEngine
    from .store import open_store

    log = log or _stderr
    if adapter == "default":
        if shipped_adapter(model or DEFAULT_MODEL) is None:
            log(f"note: no trained adapter ships for {model or DEFAULT_MODEL}; packets are bare (no header/trailer), "
                "so their answers can differ more from full recompute. Train one with `kvpacket train` and pass "
                "--adapter PATH.")
            adapter = None
    store = open_store(Path(store_dir) if store_dir is not None else demo_dir() / "packets")
    started = time.perf_counter()
    if model is None and not any(cache_dir().glob(f"models/{DEFAULT_MODEL}-*/config.json")):
        log(f"first run: converting the default model {DEFAULT_MODEL} from its GGUF file to safetensors in "
            f"{cache_dir() / 'models'} (about 20 s, once)…")
    else:
        log(f"loading {model or DEFAULT_MODEL}…")
    engine = PacketEngine(model, adapter=adapter, store=store, device=device, dtype=dtype)
    log(f"model ready in {time.perf_counter() - started:.1f} s")
    return engine


@dataclass
class IngestSummary:
    """How the demo index was obtained.

    Attributes:
        index_dir: the saved index directory; reopened: True when a saved index was reused.
        documents, chunks: indexed; packets_built: packets computed in this process; packets_reused: chunk packets
            found in the store; seconds: wall time of opening/ingesting.
    """

    index_dir: Path
    reopened: bool
    documents: int
    chunks: int
    packets_built: int
    packets_reused: int
    seconds: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "index_dir": str(self.index_dir)}


def index_dir_for(engine, root: str | Path | None = None, calibration: CalibrationConfig | None = None) -> Path:
    """The saved-index directory for ``engine``'s model, adapter and dtype and the index's neighbour
    ``calibration`` under ``root`` (default `demo_dir`)."""
    model = engine.model
    settings = f"{model.fingerprint}|{engine.adapter.fingerprint}|{model.dtype}"
    if calibration is not None:
        settings += f"|{json.dumps(asdict(calibration), sort_keys=True)}"
    key = hashlib.sha256(settings.encode()).hexdigest()
    return Path(root if root is not None else demo_dir()) / f"index-{key[:12]}"


def open_demo_index(engine, corpus: Sequence[Document] | None = None, root: str | Path | None = None,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    calibration: CalibrationConfig | None = None) -> tuple[PacketIndex, IngestSummary]:
    """Open the saved demo index of ``engine`` or ingest ``corpus`` (default: the bundled one) into a new one.

    A saved index is synchronised with ``corpus``: changed or removed documents are dropped and new ones added,
    so only their packets are built. Packets already in the engine's store are never rebuilt. With
    ``calibration`` (``neighbours`` set), each chunk's adapter packet is built after contexts drawn from its
    nearest chunks of the corpus (see `PacketIndex`); such an index is kept in a directory of its own.
    """
    log = log or _stderr
    corpus = list(corpus) if corpus is not None else load_corpus()
    directory = index_dir_for(engine, root, calibration)
    started = time.perf_counter()
    built_before = engine.counters["packets_built"]
    embedder = quiet_embedder()
    index, reopened = None, False
    if (directory / "manifest.json").is_file():
        try:
            index, reopened = PacketIndex.open(directory, engine, embedder), True
        except KVPacketError as error:
            log(f"the saved index in {directory} cannot be used ({error}); building a new one")
    if index is None:
        index = PacketIndex(engine, embedder, calibration=calibration)
    changed = _drop_stale_documents(index, corpus)
    new = [doc for doc in corpus if doc.doc_id not in index.documents]
    if new:
        log(f"ingesting {len(new)} documents into {directory} …")
        index.add_documents(new, progress=progress)
    if new or changed or not reopened:
        index.save(directory)
    built = engine.counters["packets_built"] - built_before
    summary = IngestSummary(directory, reopened, len(index.documents), len(index), built,
                            max(0, len(index.packet_keys()) * len(engine.ingest_builders) - built),
                            time.perf_counter() - started)
    return index, summary


def quiet_embedder():
    """The default offline `Embedder`, loaded without transformers' progress bars."""
    from transformers.utils import logging as hf_logging

    from .embedder import Embedder

    hf_logging.disable_progress_bar()
    try:
        return Embedder()
    finally:
        hf_logging.enable_progress_bar()


def _drop_stale_documents(index: PacketIndex, corpus: Sequence[Document]) -> bool:
    wanted = {doc.doc_id: hashlib.sha256(doc.text.encode()).hexdigest() for doc in corpus}
    stale = [doc_id for doc_id, entry in index.documents.items() if wanted.get(doc_id) != entry["sha256"]]
    for doc_id in stale:
        index.delete_document(doc_id)
    return bool(stale)


# ---- chat --------------------------------------------------------------------------------------------------------


@dataclass
class DemoReply:
    """One answered question.

    Attributes:
        question: as asked; sources: the retrieved chunks (context order, best first).
        packet: the answer through KV packets; full: the full-recompute answer (only with ``compare``).
        retrieval_s: time spent retrieving; history_turns: earlier turns in the prompt.
        conversation_cached: the earlier turns came from the session's kept cache (not forwarded again).
    """

    question: str
    sources: list[SearchHit]
    packet: RAGAnswer
    full: RAGAnswer | None = None
    retrieval_s: float = 0.0
    history_turns: int = 0
    conversation_cached: bool = False

    @property
    def source_ids(self) -> list[str]:
        return [hit.chunk.doc_id for hit in self.sources]

    def to_dict(self) -> dict:
        def one(answer: RAGAnswer) -> dict:
            return {"text": answer.text, "method": answer.answer.method, "ttft_s": answer.timings["ttft_s"],
                    "total_s": answer.timings["total_s"], "forwarded_tokens": answer.answer.forwarded_tokens,
                    "context_tokens": answer.answer.context_tokens}

        return {"question": self.question, "answer": self.packet.text,
                "sources": [{"doc_id": h.chunk.doc_id, "score": round(h.score, 4)} for h in self.sources],
                "retrieval_s": self.retrieval_s, "conversation_cached": self.conversation_cached,
                "kv_packet": one(self.packet),
                "full_recompute": one(self.full) if self.full is not None else None}


PieceCallback = Callable[[str, str], None]
"""Receives ``(method, text piece)`` while an answer streams."""


@dataclass
class DemoChat:
    """A multi-turn chat over a `PacketIndex`.

    Follow-up questions ("Where was she born?") name no entity, so retrieval also searches the last two questions
    joined to the new one and keeps the best-scoring chunks of both searches.

    Packet answers go through a chat session (`kvpacket_rag.session.ChatSession`): while a turn retrieves the
    chunks of the previous one, only its new message is forwarded; other chunks reassemble the conversation over
    their packets.

    Attributes:
        index: the index to retrieve from and answer with.
        top_k: chunks per question (>= 1).
        generation: decoding settings (default: greedy, 48 new tokens).
        max_history: earlier turns kept in the prompt (older ones are dropped, and the turn that drops one
            reassembles the conversation).
        method: how packets are read: ``kv_packet_first_exact`` (the first retrieved chunk from its exact packet,
            the others from adapter packets) or ``kv_packet`` (adapter packets only); default: the engine's method.
    """

    index: PacketIndex
    top_k: int = 3
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=48))
    max_history: int = 8
    history: list[ChatTurn] = field(default_factory=list)
    method: str | None = None

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_history < 0:
            raise ValueError(f"max_history must be >= 0, got {self.max_history}")
        self.method = self.method or self.index.engine.method.name
        if self.method not in PACKET_READINGS:
            raise ValueError(f"method must be one of {', '.join(PACKET_READINGS)}, got {self.method!r}")
        self.index.engine.preamble_block()  # computed once per engine; keeps it out of the first TTFT
        self.session = self.index.engine.session()

    def reset(self) -> None:
        """Forget the conversation (and its kept cache)."""
        self.history.clear()
        self.session.reset()

    def retrieve(self, question: str) -> list[SearchHit]:
        """The ``top_k`` chunks for ``question`` in context order (best first), using the last turn for follow-ups."""
        hits = self.index.search(question, self.top_k)
        if self.history:
            joined = " ".join([*(turn.user for turn in self.history[-2:]), question])
            best: dict[str, SearchHit] = {}
            for hit in hits + self.index.search(joined, self.top_k):
                if hit.packet_key not in best or hit.score > best[hit.packet_key].score:
                    best[hit.packet_key] = hit
            hits = sorted(best.values(), key=lambda h: -h.score)[: self.top_k]
        return hits

    def ask(self, question: str, compare: bool = False, on_piece: PieceCallback | None = None) -> DemoReply:
        """Answer ``question`` through packets (and by full recompute when ``compare``); record the turn.

        Raises:
            EmptyInputError: the question is empty. ContextTooLongError: the history grew too long (call `reset`).
        """
        started = time.perf_counter()
        hits = self.retrieve(question)
        retrieval_s = time.perf_counter() - started
        history = tuple(self.history[-self.max_history:]) if self.max_history else ()
        packet = self._answer(question, hits, history, self.method, on_piece, started, retrieval_s)
        full = None
        if compare:
            again = time.perf_counter()
            full = self._answer(question, hits, history, "full_recompute", on_piece, again - retrieval_s, retrieval_s)
        self.history.append(ChatTurn(question.strip(), packet.text.strip()))
        suffix = self.index.engine.formatter.suffix_ids(question, history)
        cached = bool(history) and packet.answer.forwarded_tokens < len(suffix)
        return DemoReply(question, hits, packet, full, retrieval_s, len(history), cached)

    def _answer(self, question, hits, history, method, on_piece, started, retrieval_s) -> RAGAnswer:
        stream = stream_answer(self.index.engine, question, [h.text for h in hits],
                               recorded_keys=[h.packet_key for h in hits], missing=self.index.missing_packets,
                               history=history, generation=self.generation, method=method, sources=hits,
                               started=started, retrieval_s=retrieval_s,
                               session=self.session if method == self.method else None)
        for piece in stream:
            if on_piece is not None:
                on_piece(method, piece)
        assert stream.result is not None
        return stream.result


def _stderr(message: str) -> None:
    print(f"kvpacket demo: {message}", file=sys.stderr, flush=True)
