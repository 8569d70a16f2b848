"""How often the gold answer stands in the first chunk a question reads (`metrics.answer_recall`, the check of the eval's
recall column), in the dataset's order and in retrieval order (chunks ranked by the default embedder's similarity to
the question, as `kvpacket eval --order retrieval` ranks them): the chunk the default reading takes from its exact
packet.

    python benchmarks/adapter/experiments/answer_in_first_chunk.py
"""
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.embedder import Embedder
from kvpacket_rag.evaluation.harness import retrieval_order
from kvpacket_rag.metrics import answer_recall


def answer_in_first(samples) -> int:
    return int(sum(answer_recall(sample.chunks[0], sample.answers) for sample in samples))


embedder = Embedder()
for dataset, seed, n in (("hotpotqa", 1, 30), ("biography", 0, 100), ("niah", 0, 30), ("squad", 0, 100)):
    samples = load_samples(dataset, "test", n, seed)
    print(f"{dataset} (test split, seed {seed}, {n} questions): answer in the first chunk, dataset order "
          f"{answer_in_first(samples)}, retrieval order {answer_in_first(retrieval_order(samples, embedder))}")
