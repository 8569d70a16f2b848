"""`kvpacket eval` with `kv_packet_refresh` taking one token count per rank: ``kv_packet_refresh:64/8`` recomputes the
first 64 tokens of the second chunk read and the first 8 of every later one (the last count repeats), so that a
question-time budget can go to the best-ranked chunks instead of evenly to all (``kv_packet_refresh:8`` is unchanged).

    python benchmarks/adapter/experiments/focused_refresh.py --dataset hotpotqa --methods kv_packet_refresh:64/8 ...

takes every argument of `kvpacket eval`.
"""
import sys

import torch

from kvpacket_rag import methods
from kvpacket_rag.baselines import PacketRefresh
from kvpacket_rag.cli import main


class FocusedRefresh(PacketRefresh):
    """kv_packet_refresh with the counts ``K1/K2/.../Kn``: chunk ``j >= 1`` (in reading order) gets
    ``K[min(j, n) - 1]`` recomputed tokens."""

    def __init__(self, counts: str = "4"):
        self.counts = [int(k) for k in str(counts).split("/")]
        super().__init__(self.counts[-1])
        self.name = f"{self.family}:{'/'.join(map(str, self.counts))}"

    def recomputes_nothing(self) -> bool:
        return not any(self.counts)

    def choose(self, deviation, skip, chunk_lengths):
        starts = (torch.tensor([0] + chunk_lengths[:-1]).cumsum(0) + skip).tolist()
        spans = [torch.arange(s, s + min(self.counts[min(j, len(self.counts)) - 1], n))
                 for j, (s, n) in enumerate(zip(starts, chunk_lengths)) if j >= self.first_chunk]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)


methods.METHODS["kv_packet_refresh"] = FocusedRefresh
sys.exit(main(["eval", *sys.argv[1:]]))
