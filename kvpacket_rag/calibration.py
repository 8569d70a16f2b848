"""Calibration contexts: packets averaged over what typically precedes a chunk in a retrieved context.

A packet built right after the preamble is what its chunk computes at the head of a context; in a retrieved
context it usually follows other passages of the same corpus, which change its keys and values. `calibrate`
draws ``contexts`` sequences of ``depth`` passages each from a corpus and returns an adapter that builds every
packet once after each sequence and stores the mean (`kvpacket_rag.adapter.PacketAdapter.calibration`). Packets
stay independent of each other and of the question; building one costs ``contexts`` forwards of its chunk.
Draw the passages from the corpus that will be served (or one like it): passages of another domain move the
packets the wrong way.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Sequence

from .adapter import PacketAdapter
from .errors import InvalidInputError
from .prompt import PromptFormatter


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration contexts are drawn.

    Attributes:
        contexts: how many contexts each packet is averaged over (>= 1; each costs one forward per packet).
        depth: passages per context (>= 1), joined as the engine joins retrieved chunks.
        seed: the draw's seed.
    """

    contexts: int = 4
    depth: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("contexts", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"calibration {name} must be an int >= 1, got {value!r}")


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
        InvalidInputError: too few passages for the depth.
    """
    ids = [formatter.chunk_ids(text) for text in passages if text.strip()]
    contexts = draw_contexts(ids, config)
    card = {"calibrated_from": adapter.fingerprint, "calibration": {**asdict(config), "passages": len(ids),
                                                                    "source": source}}
    if adapter.card:
        card["base_card"] = adapter.card
    return adapter.with_calibration(contexts, card)
