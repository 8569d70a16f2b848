"""`PacketIndex`: documents in, chunks with packets and a FAISS index out; questions answered through packets.

Ingestion (offline): documents -> token-aware chunks -> MiniLM vectors in a FAISS inner-product index
(vectors are unit length, so scores are cosine similarities) + one KV packet per chunk in the engine's
store. Packets are content addressed: a chunk already in the store (same text, model, adapter) is
never built again, whichever document it came from.

Questions: embed -> top-k chunks -> their packets -> `PacketEngine` -> answer, sources and timings.
With nothing retrieved the question is answered closed-book and the answer says so.

Persistence: ``save(dir)`` writes the FAISS vectors and the chunk / document records (no pickle),
then ``manifest.json`` (fingerprints of model, tokenizer, adapter and embedder, the data files and
their digests) with one atomic rename, so a crash never leaves an index that cannot be opened
(see `kvpacket_rag.index_files`). Packets stay in the
engine's store: use a persistent store (a local directory or Redis) so that ``PacketIndex.open`` needs
no rebuild.

Example:
    >>> engine = PacketEngine(store=open_store("packets/"))
    >>> index = PacketIndex(engine)                           # default MiniLM embedder, 200-token chunks
    >>> index.add_documents([Document(text, doc_id="handbook.md")])
    >>> result = index.answer("Who founded Quill Press?", k=3)
    >>> result.text, [hit.chunk.doc_id for hit in result.sources], result.timings["ttft_s"]
    >>> index.save("my-index/")
    >>> index = PacketIndex.open("my-index/", engine)         # no rebuild; other model/embedder -> clear error
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .calibration import CalibrationConfig, NeighbourContexts
from .chunker import Chunker, ChunkerConfig
from .errors import CorruptIndexError, EmptyInputError, IncompatiblePacketError, KVPacketError, PacketNotFoundError
from .generation import GenerationConfig
from .index_files import INDEX_FORMAT, read_manifest, save_index_files
from .prompt import ChatTurn
from .rag import MissingPackets, RAGAnswer, RAGAnswerStream, stream_answer

if TYPE_CHECKING:
    from .embedder import Embedder
    from .engine import PacketEngine


class IndexMismatchError(IncompatiblePacketError):
    """A saved index was built with another model, tokenizer, adapter or embedder than the one given."""


class DuplicateDocumentError(KVPacketError, ValueError):
    """A document id is already indexed with a different text."""


@dataclass(frozen=True)
class Document:
    """A document to ingest.

    Attributes:
        text: the full text (non-empty).
        doc_id: stable id (default: ``sha256:`` + the first 16 hex digits of the text's hash).
        metadata: JSON-serialisable fields copied onto each of its chunks.
    """

    text: str
    doc_id: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkRecord:
    """One indexed chunk.

    Attributes:
        chunk_id: its id in the FAISS index (int64, unique within the index).
        doc_id: the document it came from; position: its rank within that document (0-based).
        text: the chunk text (what the packet encodes); start, end: character offsets in the document.
        n_tokens: tokens of the text under the model's tokenizer.
        packet_key: content address of its packet in the engine's store.
        metadata: the document's metadata.
    """

    chunk_id: int
    doc_id: str
    position: int
    text: str
    start: int
    end: int
    n_tokens: int
    packet_key: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchHit:
    """A retrieved chunk and its cosine similarity to the question (higher is closer)."""

    chunk: ChunkRecord
    score: float

    @property
    def text(self) -> str:
        return self.chunk.text

    @property
    def packet_key(self) -> str:
        return self.chunk.packet_key


@dataclass
class IngestReport:
    """What `PacketIndex.add_documents` did.

    Attributes:
        documents: documents added; skipped: ids of documents already indexed with the same text.
        chunks: chunk records added; packets_built: packets newly built (with neighbour calibration, also those
            of earlier chunks whose nearest chunks changed); packets_reused: packets of the added chunks already
            stored (both count every packet the engine ingests per chunk, see `PacketEngine.ingest_builders`);
            seconds: wall time.
    """

    documents: int = 0
    chunks: list[ChunkRecord] = field(default_factory=list)
    packets_built: int = 0
    packets_reused: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---- the index -----------------------------------------------------------------------------------------------------


class PacketIndex:
    """A FAISS-backed retrieval index whose chunks carry KV packets.

    Args:
        engine: answers questions and builds packets into ``engine.store``.
        embedder: text embedder (default: the offline MiniLM `Embedder`).
        chunker: a `Chunker`, a `ChunkerConfig`, or None for 200-token chunks without overlap
            (sizes in tokens of the engine's model).
        missing_packets: what `answer`/`stream` do when a chunk's packet is not in the store:
            ``build`` (default) builds it, ``error`` raises `PacketNotFoundError`.
        calibration: build each chunk's adapter packet after contexts drawn from its nearest chunks of this index
            (`kvpacket_rag.calibration.NeighbourContexts`; ``neighbours`` must be set), for corpora whose
            retrieved chunks resemble each other. The index sets its engine to build that way (give each
            calibrated index an engine of its own); adding or deleting documents rebuilds the packets of the
            chunks whose nearest chunks changed. None (default): packets as the adapter builds them.

    Writes (``add_documents``/``delete_document``) must not run concurrently with anything else; ``search`` may run
    from several threads; answering may run from several threads and coroutines (see `PacketEngine`).
    """

    def __init__(self, engine: "PacketEngine", embedder: "Embedder | None" = None,
                 chunker: Chunker | ChunkerConfig | None = None, missing_packets: MissingPackets = "build",
                 calibration: CalibrationConfig | None = None):
        import faiss

        from .embedder import Embedder

        self.engine = engine
        self.embedder = embedder if embedder is not None else Embedder()
        if not isinstance(chunker, Chunker):
            chunker = Chunker(engine.model.tokenizer, config=chunker or ChunkerConfig())
        self.chunker = chunker
        if missing_packets not in ("build", "error"):
            raise ValueError(f"missing_packets must be 'build' or 'error', got {missing_packets!r}")
        self.missing_packets = missing_packets
        if calibration is not None and not calibration.neighbours:
            raise ValueError("an index's calibration draws each chunk's contexts from its nearest chunks: set "
                             "neighbours >= depth (shared contexts belong to the adapter: kvpacket calibrate)")
        self.calibration = calibration
        self.faiss = faiss.IndexIDMap2(faiss.IndexFlatIP(self.embedder.dim))
        self.records: dict[int, ChunkRecord] = {}
        self.documents: dict[str, dict] = {}  # doc_id -> {"sha256", "chunk_ids", "metadata"}
        self._next_id = 0

    # ---- ingestion -----------------------------------------------------------------------------------------------

    def add_documents(self, documents: Iterable[str | Document], progress: bool = False) -> IngestReport:
        """Chunk, embed and index ``documents``; build the packets not yet in the store.

        A document whose id is already indexed with the same text is skipped. Chunks whose packet is stored
        (same text under this model and adapter, e.g. from another document) reuse it.

        Raises:
            EmptyInputError: a document is empty. DuplicateDocumentError: an id is indexed with another text
            (call `delete_document` first). ContextTooLongError: a chunk exceeds the model (smaller chunks).
        """
        start = time.perf_counter()
        report = IngestReport()
        pending: list[tuple[Document, str, list]] = []
        seen: dict[str, str] = {}
        for item in documents:
            doc = item if isinstance(item, Document) else Document(item)
            if not isinstance(doc.text, str) or not doc.text.strip():
                raise EmptyInputError(f"document {doc.doc_id or len(pending)} is empty; drop empty documents first")
            digest = hashlib.sha256(doc.text.encode()).hexdigest()
            doc_id = doc.doc_id or f"sha256:{digest[:16]}"
            known = seen.get(doc_id) or self.documents.get(doc_id, {}).get("sha256")
            if known is not None:
                if known != digest:
                    raise DuplicateDocumentError(
                        f"document id {doc_id!r} is already indexed with a different text; call "
                        "index.delete_document(doc_id) first, or give the new text another id")
                report.skipped.append(doc_id)
                continue
            seen[doc_id] = digest
            pending.append((Document(doc.text, doc_id, dict(doc.metadata)), digest, self.chunker.split(doc.text)))
        texts = [chunk.text for _, _, chunks in pending for chunk in chunks]
        if texts:
            built_before = self.engine.counters["packets_built"]
            vectors = self.embedder.embed(texts)
            self._calibrate(texts, vectors)
            unique = list(dict.fromkeys(texts))  # a chunk repeated in this batch is built once
            key_of = dict(zip(unique, self.engine.ingest_packets(unique, progress=progress)))
            keys = [key_of[text] for text in texts]
            built_new = self.engine.counters["packets_built"] - built_before
            report.packets_reused = len(keys) * len(self.engine.ingest_builders) - built_new
            report.chunks = self._add_records(pending, keys, vectors)
            self._refresh_keys(progress)
            report.packets_built = self.engine.counters["packets_built"] - built_before
        report.documents = len(pending)
        report.seconds = time.perf_counter() - start
        return report

    def _add_records(self, pending, keys: list[str], vectors: np.ndarray) -> list[ChunkRecord]:
        records: list[ChunkRecord] = []
        for doc, digest, chunks in pending:
            ids = []
            for position, chunk in enumerate(chunks):
                record = ChunkRecord(self._next_id, doc.doc_id, position, chunk.text, chunk.start, chunk.end,
                                     chunk.n_tokens, keys[len(records)], dict(doc.metadata))
                self._next_id += 1
                records.append(record)
                ids.append(record.chunk_id)
            self.documents[doc.doc_id] = {"sha256": digest, "chunk_ids": ids, "metadata": dict(doc.metadata)}
        self.faiss.add_with_ids(vectors, np.array([r.chunk_id for r in records], dtype=np.int64))
        self.records.update((r.chunk_id, r) for r in records)
        return records

    def delete_document(self, doc_id: str) -> int:
        """Remove a document's chunks from the index (packets stay in the store); return how many were removed."""
        entry = self.documents.pop(doc_id, None)
        if entry is None:
            return 0
        ids = np.array(entry["chunk_ids"], dtype=np.int64)
        self.faiss.remove_ids(ids)
        for chunk_id in entry["chunk_ids"]:
            self.records.pop(chunk_id, None)
        self._calibrate()
        self._refresh_keys()
        return len(ids)

    # ---- neighbour calibration -----------------------------------------------------------------------------------

    def _calibrate(self, new_texts: Sequence[str] = (), new_vectors: np.ndarray | None = None) -> None:
        """Point the engine at neighbour contexts over the indexed chunks plus ``new_texts`` (no-op without
        calibration); vectors of indexed chunks are read back from FAISS, not re-embedded."""
        if self.calibration is None:
            return
        ids = list(self.records)
        texts = [self.records[i].text for i in ids] + list(new_texts)
        if len(set(texts)) < 2:  # one distinct chunk: nothing to draw from, packets as the adapter builds them
            self.engine.calibrate_on(None)
            return
        old = (self.faiss.reconstruct_batch(np.array(ids, dtype=np.int64)) if ids
               else np.zeros((0, self.embedder.dim), dtype=np.float32))
        vectors = np.concatenate([old, new_vectors]) if new_vectors is not None else old
        self.engine.calibrate_on(NeighbourContexts(texts, self.engine.formatter, self.embedder, self.calibration,
                                                   vectors))

    def _refresh_keys(self, progress: bool = False) -> None:
        """Re-key the chunks whose packet key changed (their nearest chunks did) and build those packets."""
        if self.calibration is None:
            return
        key_of = {text: self.engine.packet_key(text) for text in {r.text for r in self.records.values()}}
        changed = [r for r in self.records.values() if r.packet_key != key_of[r.text]]
        if changed:
            self.engine.ingest_packets(list(dict.fromkeys(r.text for r in changed)), progress=progress)
            for r in changed:
                self.records[r.chunk_id] = ChunkRecord(**{**asdict(r), "packet_key": key_of[r.text]})

    # ---- retrieval and answers -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    def search(self, question: str, k: int = 4, min_score: float | None = None) -> list[SearchHit]:
        """The ``k`` chunks closest to ``question``, best first, one per distinct packet.

        Args:
            question: the question (non-empty).
            k: how many chunks (>= 1).
            min_score: drop chunks whose cosine similarity is below this.

        Returns:
            up to ``k`` hits (fewer when the index is small, empty when nothing passes ``min_score``).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        query = self.embedder.embed_query(question)[None, :]
        total = self.faiss.ntotal
        want = min(total, 2 * k)
        while True:
            hits = self._unique_hits(query, want, min_score)
            if len(hits) >= k or want >= total:
                return hits[:k]
            want = min(total, want * 4)

    def _unique_hits(self, query: np.ndarray, want: int, min_score: float | None) -> list[SearchHit]:
        if want == 0:
            return []
        scores, ids = self.faiss.search(query, want)
        hits: list[SearchHit] = []
        keys: set[str] = set()
        for score, chunk_id in zip(scores[0], ids[0]):
            if chunk_id < 0 or (min_score is not None and score < min_score):
                continue
            record = self.records[int(chunk_id)]
            if record.packet_key not in keys:
                keys.add(record.packet_key)
                hits.append(SearchHit(record, float(score)))
        return hits

    def answer(self, question: str, k: int = 4, *, history: Sequence[ChatTurn] = (),
               generation: GenerationConfig | None = None, method: str | None = None,
               min_score: float | None = None) -> RAGAnswer:
        """Retrieve the top-``k`` chunks and answer through their packets. See `stream`."""
        return self.stream(question, k, history=history, generation=generation, method=method,
                           min_score=min_score).collect()

    def stream(self, question: str, k: int = 4, *, history: Sequence[ChatTurn] = (),
               generation: GenerationConfig | None = None, method: str | None = None,
               min_score: float | None = None) -> RAGAnswerStream:
        """Retrieve the top-``k`` chunks and stream the answer through their packets.

        Args:
            question: the user's question (non-empty).
            k: chunks to retrieve; they enter the context best first.
            history: earlier turns of the conversation; they follow the packets in the prompt, so the packets
                of a follow-up question are reused from the store.
            generation: decoding settings (default: greedy, 64 tokens).
            method: ``kv_packet_first_exact``, ``kv_packet`` or a baseline (``full_recompute``, ``no_recompute``,
                ...); default: the engine's method.
            min_score: drop chunks below this cosine similarity; with none left the answer is closed-book.

        Raises:
            EmptyInputError, PacketNotFoundError (``missing_packets='error'``), ContextTooLongError.
        """
        started = time.perf_counter()
        hits = self.search(question, k, min_score)
        retrieval_s = time.perf_counter() - started
        return stream_answer(self.engine, question, [h.text for h in hits],
                             recorded_keys=[h.packet_key for h in hits], missing=self.missing_packets,
                             history=history, generation=generation, method=method, sources=hits,
                             started=started, retrieval_s=retrieval_s)

    # ---- persistence ---------------------------------------------------------------------------------------------

    def fingerprints(self) -> dict[str, str]:
        """What the index's packets and vectors depend on (recorded in the manifest)."""
        model = self.engine.model
        return {"model": model.fingerprint, "model_name": model.name, "tokenizer": model.tokenizer_fingerprint,
                "adapter": self.engine.adapter.fingerprint, "dtype": str(model.dtype).removeprefix("torch."),
                "embedder": self.embedder.fingerprint, "embedder_name": self.embedder.name}

    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` (created if needed): manifest, FAISS file and chunk records.

        Crash-safe: the data files are written under new names, then the manifest is switched with one
        atomic rename (see `kvpacket_rag.index_files`). Packets are not copied: they live in the
        engine's store.
        """
        import faiss

        records = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in self.records.values())
        documents = "".join(json.dumps({"doc_id": d, **entry}, ensure_ascii=False) + "\n"
                            for d, entry in self.documents.items())
        manifest = {"format": INDEX_FORMAT, "fingerprints": self.fingerprints(), "dim": self.embedder.dim,
                    "chunker": asdict(self.chunker.config), "next_id": self._next_id, "chunks": len(self.records),
                    "calibration": asdict(self.calibration) if self.calibration is not None else None}
        writers = {"chunks": lambda path: path.write_bytes(records.encode()),
                   "documents": lambda path: path.write_bytes(documents.encode()),
                   "faiss": lambda path: faiss.write_index(self.faiss, str(path))}
        directory = Path(directory)
        save_index_files(directory, writers, manifest)
        return directory

    @classmethod
    def open(cls, directory: str | Path, engine: "PacketEngine", embedder: "Embedder | None" = None, *,
             missing_packets: MissingPackets = "build", rebuild_packets: bool = False) -> "PacketIndex":
        """Load an index written by `save`; nothing is re-embedded and no stored packet is rebuilt.

        Args:
            directory: the saved index.
            engine: must use the model, tokenizer, adapter and dtype the index was built with.
            embedder: must be the embedder the index was built with (default: the offline MiniLM).
            missing_packets: packets absent from ``engine.store``: ``build`` them now (default) or raise.
            rebuild_packets: accept an engine with another model/adapter and re-key/re-build every packet
                for it (vectors are kept: they do not depend on the language model).

        Raises:
            FileNotFoundError, CorruptIndexError (malformed manifest, damaged or missing files), IndexMismatchError,
            PacketNotFoundError (``missing_packets='error'``).
        """
        import faiss

        directory = Path(directory)
        manifest, files = read_manifest(directory)
        try:
            chunker = ChunkerConfig(**manifest["chunker"])
            saved = manifest.get("calibration")
            # a manifest written before by-place calibration existed keeps its one packet per chunk
            calibration = CalibrationConfig(**{"by_place": False, **saved}) if saved is not None else None
        except (TypeError, ValueError) as error:
            raise CorruptIndexError(f"{directory}: the manifest's chunker or calibration settings are invalid "
                                    f"({error}); save the index again") from None
        index = cls(engine, embedder, chunker, missing_packets, calibration)
        index._check_fingerprints(manifest["fingerprints"], rebuild_packets)
        index.faiss = faiss.read_index(str(files["faiss"]))
        index._load_records(files["chunks"], files["documents"])
        index._next_id = manifest["next_id"]
        if index.faiss.ntotal != len(index.records) or index.faiss.d != index.embedder.dim:
            raise CorruptIndexError(f"{directory}: the FAISS index and the chunk records disagree; save the index again")
        index._calibrate()
        if rebuild_packets:
            index._rekey()
        index._check_packets(missing_packets)
        return index

    def _load_records(self, chunks: Path, documents: Path) -> None:
        try:
            for line in chunks.read_text(encoding="utf-8").splitlines():
                record = ChunkRecord(**json.loads(line))
                self.records[record.chunk_id] = record
            for line in documents.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                self.documents[entry.pop("doc_id")] = entry
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
            raise CorruptIndexError(f"{chunks.parent}: a chunk or document record is malformed ({error}); save the "
                                    "index again") from None

    def _check_fingerprints(self, saved: dict, rebuild_packets: bool) -> None:
        current = self.fingerprints()
        if saved["embedder"] != current["embedder"]:
            raise IndexMismatchError(
                f"the index was built with embedder {saved['embedder_name']!r} ({saved['embedder'][:12]}) but "
                f"{current['embedder_name']!r} ({current['embedder'][:12]}) was given; open it with the same "
                "embedder, or rebuild the index with add_documents")
        different = [name for name in ("model", "tokenizer", "adapter", "dtype") if saved[name] != current[name]]
        if different and not rebuild_packets:
            raise IndexMismatchError(
                f"the index's packets were built with another {', '.join(different)} (model {saved['model_name']}, "
                f"adapter {saved['adapter'][:12]}, {saved['dtype']}) than this engine (model {current['model_name']}, "
                f"adapter {current['adapter'][:12]}, {current['dtype']}); open it with that engine, or pass "
                "rebuild_packets=True to build packets for this one")

    def _rekey(self) -> None:
        for chunk_id, record in list(self.records.items()):
            self.records[chunk_id] = ChunkRecord(**{**asdict(record),
                                                    "packet_key": self.engine.packet_key(record.text)})

    def _check_packets(self, missing: MissingPackets) -> None:
        texts = list(dict.fromkeys(r.text for r in self.records.values()))
        store = self.engine.store
        absent = [(builder, [text for text in texts if not store.contains(builder.key_for(builder.chunk_ids(text)))])
                  for builder in self.engine.ingest_builders]
        count = sum(len(missing_texts) for _, missing_texts in absent)
        if count and missing == "error":
            raise PacketNotFoundError(
                f"{count} of {len(texts) * len(absent)} packets of this index are not in the engine's store; open it "
                "with the store it was built into, or pass missing_packets='build' to rebuild them")
        missing_texts = list(dict.fromkeys(text for _, texts_of in absent for text in texts_of))
        if missing_texts:
            self.engine.ingest_packets(missing_texts)

    def packet_keys(self) -> list[str]:
        """Distinct packet keys of the indexed chunks."""
        return sorted({r.packet_key for r in self.records.values()})

    def stats(self) -> dict:
        """Counts: documents, chunks, distinct packets, and the store's stats."""
        return {"documents": len(self.documents), "chunks": len(self.records), "packets": len(self.packet_keys()),
                "store": self.engine.store.stats()}
