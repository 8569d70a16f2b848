"""Oracle: packets built after the chunk's actual predecessors. How much of the gap to full recompute is theirs?

Runs `kvpacket eval` (same arguments) with one change: a chunk at place p of its question (p chunks before it) is
built after contexts whose last ``--true-last`` passages are the chunks that really precede it in its question, the
earlier ones (up to min(p, --calibration-depth) in all) drawn from its nearest passages as usual. This reads the
question's own context, so it is not a product reading: it bounds what packets keyed by their predecessor could
gain. ``--true-last`` at least the depth rebuilds each chunk in its own context (full recompute up to float error).
In the evaluated sets every passage belongs to one question; a passage met at several places keeps its first.

    python benchmarks/adapter/experiments/predecessor_oracle_eval.py --true-last 1 --dataset biography \
        --methods kv_packet --n 30 --split test --seed 1 --max-new-tokens 24 --adapter none+preamble \
        --calibrate-neighbours 1000 --calibration-contexts 4 --calibration-depth 4 --device cpu --threads 2 \
        --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import random
import sys

import numpy as np

from kvpacket_rag.calibration import NeighbourContexts
from kvpacket_rag.cli import main
from kvpacket_rag.evaluation import harness


class TruePredecessorContexts(NeighbourContexts):
    """`NeighbourContexts` whose contexts end in the chunk's actual predecessors."""

    def __init__(self, *args, before: dict[tuple[int, ...], tuple[tuple[int, ...], ...]], true_last: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.before, self.true_last = before, true_last

    def _draw(self, ids: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], ...]:
        prior = self.before.get(ids, ())
        depth = min(len(prior), self.config.depth)
        if depth == 0:
            return ((),)
        true = prior[len(prior) - min(self.true_last, depth):]
        rest = depth - len(true)
        if rest == 0:
            return (true,)
        near = [tuple(passage) for passage in self.nearest(ids) if tuple(passage) not in true]
        seed = hashlib.sha256(np.asarray([self.config.seed, *ids], dtype=np.int64).tobytes()).digest()
        rng = random.Random(seed)
        return tuple(tuple(rng.sample(near, min(rest, len(near)))) + true for _ in range(self.config.contexts))


def oracle_contexts(true_last: int):
    def contexts(engine, samples, calibration, embedder):
        before: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {}
        for sample in samples:
            chunks = [tuple(engine.formatter.chunk_ids(chunk)) for chunk in sample.chunks]
            for place, chunk in enumerate(chunks):
                before.setdefault(chunk, tuple(chunks[:place]))
        passages = [chunk for sample in samples for chunk in sample.chunks]
        one_packet = dataclasses.replace(calibration, by_place=False)  # each chunk's place is read here
        return TruePredecessorContexts(passages, engine.formatter, embedder, one_packet, before=before,
                                       true_last=true_last)
    return contexts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--true-last", type=int, required=True)
    known, rest = parser.parse_known_args()
    harness._neighbour_contexts = oracle_contexts(known.true_last)
    sys.exit(main(["eval", *rest]))
