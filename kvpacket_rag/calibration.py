"""Calibration contexts: packets averaged over what typically precedes a chunk in a retrieved context.

A packet built right after the preamble is what its chunk computes at the head of a context; in a retrieved
context it usually follows other passages of the same corpus, which change its keys and values. `calibrate`
draws ``contexts`` sequences of ``depth`` passages each from a corpus and returns an adapter that builds every
packet once after each sequence and stores the mean (`kvpacket_rag.adapter.PacketAdapter.calibration`). Packets
stay independent of each other and of the question; building one costs ``contexts`` forwards of its chunk.
Draw the passages from the corpus that will be served (or one like it): passages of another domain move the
packets the wrong way.

Where a retriever brings related passages together (multi-hop questions, several documents on one subject), a
chunk's real context resembles its nearest passages more than random ones: `NeighbourContexts` draws each chunk's
contexts from its own nearest passages of the served corpus, and `PacketBuilder` builds with them instead of the
adapter's shared contexts.

A chunk read at place p of a retrieved context (p chunks before it) is preceded by p passages; with
``CalibrationConfig.by_place`` (the default with neighbour contexts) it gets one packet per place, built after the
last ``min(p, depth)`` passages of each of its contexts (`NeighbourContexts.at_depth`), and at place 0 the packet
built after no context at all.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .adapter import PacketAdapter
from .errors import InvalidInputError
from .prompt import PromptFormatter

if TYPE_CHECKING:
    from .embedder import Embedder


SHARED_DEFAULTS = (4, 2)
"""Contexts and depth of shared calibration contexts when not given (measured on biography)."""
NEIGHBOUR_DEFAULTS = (4, 4)
"""Contexts and depth of neighbour contexts when not given: on validation questions 4 passages beat 2 (HotpotQA
answer KL −34 % with one packet per chunk), and by place 4 contexts beat 2 (HotpotQA KL −17 %, biography −10 %;
level on held-out HotpotQA questions) at twice the build cost."""


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration contexts are drawn.

    Attributes:
        contexts: how many contexts each packet is averaged over (>= 1; each costs one forward per packet);
            default 4.
        depth: passages per context (>= 1), joined as the engine joins retrieved chunks; default 2 for shared
            contexts, 4 with ``neighbours``.
        seed: the draw's seed.
        neighbours: 0 to draw one set of contexts from the whole corpus, shared by every chunk (`calibrate`);
            N >= ``depth`` to draw each chunk's own contexts from its N nearest passages (`NeighbourContexts`).
        by_place: with ``neighbours``, give each chunk one packet per place among the retrieved chunks: read at
            place p (p chunks before it) it is built after the last ``min(p, depth)`` passages of each context, at
            place 0 after none. ``depth`` then caps the places told apart: set it to the retrieval's top-k − 1.
            Each place costs one more stored packet per chunk. Default: on with ``neighbours`` (lower answer KL
            than one packet per chunk on HotpotQA, than the shared calibrated adapter on biography and SQuAD), off
            for shared contexts (where it is refused).
    """

    contexts: int | None = None
    depth: int | None = None
    seed: int = 0
    neighbours: int = 0
    by_place: bool | None = None

    def __post_init__(self) -> None:
        defaults = NEIGHBOUR_DEFAULTS if self.neighbours else SHARED_DEFAULTS
        for name, default in zip(("contexts", "depth"), defaults):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"calibration {name} must be an int >= 1, got {value!r}")
        if not isinstance(self.neighbours, int) or (self.neighbours and self.neighbours < self.depth):
            raise ValueError(f"calibration neighbours must be 0 or an int >= depth ({self.depth}), "
                             f"got {self.neighbours!r}")
        if self.by_place is None:
            object.__setattr__(self, "by_place", bool(self.neighbours))
        if self.by_place and not self.neighbours:
            raise ValueError("by_place calibration draws each chunk's contexts from its nearest passages: set "
                             "neighbours >= depth too")


def _top_k_others(vectors: np.ndarray, k: int, block_floats: int = 1 << 24) -> np.ndarray:
    """``[P, k]`` int64: for each row of ``vectors [P, d]`` (k < P), the k other rows of highest dot product,
    highest first (equal scores by row order); scored ``block_floats // P`` rows at a time."""
    count = len(vectors)
    table = np.empty((count, k), dtype=np.int64)
    step = max(1, block_floats // count)
    for start in range(0, count, step):
        scores = vectors[start:start + step] @ vectors.T
        rows = np.arange(len(scores))
        scores[rows, start + rows] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        picked = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -picked), axis=1)
        table[start:start + step] = np.take_along_axis(top, order, axis=1)
    return table


def draw_contexts(passages: Sequence[Sequence[int]], config: CalibrationConfig) -> list[list[int]]:
    """``config.contexts`` token sequences, each ``config.depth`` distinct passages (token ids) joined in order.

    Raises:
        InvalidInputError: fewer non-empty passages than ``config.depth``.
    """
    pool = [list(ids) for ids in passages if len(ids)]
    if len(pool) < config.depth:
        raise InvalidInputError(f"calibration needs at least {config.depth} non-empty passages (depth), got "
                                f"{len(pool)}; pass more passages or a smaller depth")
    rng = random.Random(config.seed)
    return [[t for ids in rng.sample(pool, config.depth) for t in ids] for _ in range(config.contexts)]


def calibrate(adapter: PacketAdapter, formatter: PromptFormatter, passages: Sequence[str],
              config: CalibrationConfig = CalibrationConfig(), source: str = "") -> PacketAdapter:
    """``adapter`` (its soft tokens and build weights) with calibration contexts drawn from ``passages``.

    Args:
        adapter: the adapter to calibrate (``PacketAdapter.empty(model, "preamble")`` for bare packets); its
            packets are then built after the preamble and one context at a time.
        formatter: tokenizes passages as the engine tokenizes retrieved chunks.
        passages: texts of the corpus (blank ones are skipped).
        source: where the passages come from, for the card.

    Raises:
        ValueError: ``config.neighbours`` is set (per-chunk contexts belong to a builder: `NeighbourContexts`).
        InvalidInputError: too few passages for the depth.
    """
    if config.neighbours:
        raise ValueError("calibrate draws contexts shared by every chunk; for each chunk's nearest passages build "
                         "with NeighbourContexts")
    ids = [formatter.chunk_ids(text) for text in passages if text.strip()]
    contexts = draw_contexts(ids, config)
    card = {"calibrated_from": adapter.fingerprint, "calibration": {**asdict(config), "passages": len(ids),
                                                                    "source": source}}
    if adapter.card:
        card["base_card"] = adapter.card
    return adapter.with_calibration(contexts, card)


class NeighbourContexts:
    """Calibration contexts of each chunk drawn from its nearest passages of a corpus.

    A chunk's contexts are ``config.contexts`` sequences of ``config.depth`` distinct passages (fewer when the
    corpus has fewer other passages), drawn from its ``config.neighbours`` nearest other passages by the
    embedder's cosine similarity and joined in the order drawn. The draw is seeded by ``config.seed`` and the
    chunk's token ids, so a chunk's contexts (and so its packet) depend only on the chunk, the corpus and the
    configuration.

    Args:
        passages: the corpus's chunk texts, as the engine will retrieve them (blank and repeated ones are skipped).
        formatter: tokenizes passages as the engine tokenizes chunks.
        embedder: embeds passages, and chunks outside the corpus when they are built.
        config: contexts per chunk, passages per context, seed, and ``neighbours``: how many nearest passages
            each chunk's contexts are drawn from.
        vectors: the passages' unit-length embeddings ``[len(passages), dim]`` when already computed (e.g. read
            back from a FAISS index); None embeds them.

    Attributes:
        fingerprint: sha256 hex over the configuration (``by_place`` aside: it chooses among packets, it does not
            change them) and the embedder. A packet built with these contexts records it and a digest of its own
            contexts (`digest`), so the packet of a chunk whose nearest passages are the same in another corpus is
            the same packet.
        depth: passages of each context read: ``config.depth``, or less after `at_depth`.

    Raises:
        ValueError: ``config.neighbours`` is 0.
        InvalidInputError: fewer than two distinct non-blank passages.
    """

    def __init__(self, passages: Sequence[str], formatter: PromptFormatter, embedder: "Embedder",
                 config: CalibrationConfig = CalibrationConfig(neighbours=8), vectors: np.ndarray | None = None):
        if not config.neighbours:
            raise ValueError("NeighbourContexts needs config.neighbours >= depth (how many nearest passages to draw "
                             "from); for contexts shared by every chunk use calibrate")
        if vectors is not None and np.shape(vectors) != (len(passages), embedder.dim):
            raise ValueError(f"vectors must be [{len(passages)}, {embedder.dim}] (one row per passage), got "
                             f"{list(np.shape(vectors))}")
        first: dict[str, int] = {}
        for row, text in enumerate(passages):
            if text.strip():
                first.setdefault(text, row)
        if len(first) < 2:
            raise InvalidInputError(f"neighbour calibration needs at least 2 distinct non-blank passages, got "
                                    f"{len(first)}; calibrate on the whole corpus, not one chunk")
        self.config, self.embedder, self.formatter = config, embedder, formatter
        self.passages = [formatter.chunk_ids(text) for text in first]
        chosen = embedder.embed(list(first)) if vectors is None else np.asarray(vectors)[list(first.values())]
        self.vectors = np.ascontiguousarray(chosen, dtype=np.float32)
        self._row = {tuple(ids): row for row, ids in enumerate(self.passages)}
        drawn = {name: value for name, value in asdict(config).items() if name != "by_place"}  # a reading choice
        self.fingerprint = hashlib.sha256(json.dumps([drawn, embedder.fingerprint]).encode()).hexdigest()
        self.depth = config.depth
        self._contexts = functools.lru_cache(maxsize=4096)(self._draw)

    def nearest(self, ids: Sequence[int]) -> list[list[int]]:
        """The ``config.neighbours`` passages nearest to the chunk ``ids`` (token ids), nearest first, itself
        excluded."""
        row = self._row.get(tuple(ids))
        if row is not None:
            return [self.passages[j] for j in self._nearest_rows[row]]
        vector = self.embedder.embed([self.formatter.tokenizer.decode(list(ids))])[0]
        scores = self.vectors @ vector
        order = np.argsort(-scores, kind="stable")[:min(self.config.neighbours, len(self.passages))]
        return [self.passages[j] for j in order]

    @functools.cached_property
    def _nearest_rows(self) -> np.ndarray:
        """``[P, k]`` rows of each corpus passage's k nearest other passages, nearest first, from one blocked
        matrix product over the corpus on first use."""
        return _top_k_others(self.vectors, min(self.config.neighbours, len(self.passages) - 1))

    def at_depth(self, depth: int) -> "NeighbourContexts":
        """These contexts cut to their last ``depth`` passages (those nearest the chunk in the joined order): what a
        chunk read at place ``depth`` is built after. Shares the corpus, the ranking and the draws (0 <= depth <=
        ``config.depth``)."""
        if not 0 <= depth <= self.config.depth:
            raise ValueError(f"depth must be in 0..{self.config.depth} (the drawn depth), got {depth!r}")
        cut = copy.copy(self)
        cut.depth = depth
        return cut

    def contexts_for(self, ids: Sequence[int]) -> list[list[int]]:
        """The chunk's calibration contexts (token ids): ``config.contexts`` draws of ``config.depth`` passages
        (of their last `depth` passages after `at_depth`)."""
        return [[t for passage in context[max(0, len(context) - self.depth) :] for t in passage]
                for context in self._contexts(tuple(ids))]

    def digest(self, ids: Sequence[int]) -> str:
        """sha256 hex over the chunk's calibration contexts: what its packet depends on besides the chunk."""
        digest = hashlib.sha256()
        for context in self.contexts_for(ids):
            digest.update(np.asarray(context, dtype=np.int64).tobytes() + b"|")
        return digest.hexdigest()

    def _draw(self, ids: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """``config.contexts`` draws, each a tuple of ``config.depth`` passages (fewer when fewer are near)."""
        near = self.nearest(ids)
        seed = hashlib.sha256(np.asarray([self.config.seed, *ids], dtype=np.int64).tobytes()).digest()
        rng = random.Random(seed)
        depth = min(self.config.depth, len(near))
        return tuple(tuple(tuple(passage) for passage in rng.sample(near, depth)) for _ in range(self.config.contexts))
