"""Neighbour calibration at matched depth: each chunk's contexts as deep as its place among the retrieved chunks.

Runs `kvpacket eval` (same arguments) with one change: a chunk at place p of its question (p chunks before it) is
built after contexts of min(p, --calibration-depth) of its nearest passages instead of a fixed depth; the first
chunk (p = 0) is built right after the preamble, i.e. its exact packet. In the evaluated sets every passage belongs
to one question, so a chunk has one place; a passage met at several places keeps its first.

    python benchmarks/adapter/experiments/matched_depth_eval.py --dataset hotpotqa --methods kv_packet \
        --n 30 --split test --seed 1 --max-new-tokens 24 --adapter none+preamble --calibrate-neighbours 8 \
        --calibration-contexts 2 --calibration-depth 8 --device cpu --threads 2 --json OUT.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys

import numpy as np

from kvpacket_rag.calibration import NeighbourContexts
from kvpacket_rag.cli import main
from kvpacket_rag.evaluation import harness


class MatchedDepthContexts(NeighbourContexts):
    """`NeighbourContexts` whose depth for a chunk is its place in its question (capped at ``config.depth``)."""

    def __init__(self, *args, places: dict[tuple[int, ...], int], **kwargs):
        super().__init__(*args, **kwargs)
        self.places = places

    def _draw(self, ids: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        depth = min(self.places.get(ids, self.config.depth), self.config.depth)
        if depth == 0:
            return ((),)
        near = self.nearest(ids)
        seed = hashlib.sha256(np.asarray([self.config.seed, *ids], dtype=np.int64).tobytes()).digest()
        rng = random.Random(seed)
        return tuple(tuple(tuple(passage) for passage in rng.sample(near, min(depth, len(near))))
                     for _ in range(self.config.contexts))


def matched_depth_contexts(engine, samples, calibration, embedder):
    places: dict[tuple[int, ...], int] = {}
    for sample in samples:
        for place, chunk in enumerate(sample.chunks):
            places.setdefault(tuple(engine.formatter.chunk_ids(chunk)), place)
    passages = [chunk for sample in samples for chunk in sample.chunks]
    one_packet = dataclasses.replace(calibration, by_place=False)  # the places are drawn here, one packet per chunk
    return MatchedDepthContexts(passages, engine.formatter, embedder, one_packet, places=places)


if __name__ == "__main__":
    harness._neighbour_contexts = matched_depth_contexts
    sys.exit(main(["eval", *sys.argv[1:]]))
