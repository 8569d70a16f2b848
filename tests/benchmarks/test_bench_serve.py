"""`kvpacket bench serve` runs end to end on the embedded model (two documents, two levels, a few tokens)."""

from __future__ import annotations

import json

from kvpacket_rag.cli import main


def test_bench_serve_writes_every_level_and_the_reference(tmp_path):
    out = tmp_path / "serve.json"
    status = main(["bench", "serve", "--documents", "2", "--questions", "3", "--concurrency", "1", "3",
                   "--max-new-tokens", "3", "--threads", "2", "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    assert [run["concurrency"] for run in result["runs"]] == [1, 3]
    for run in [*result["runs"], result["reference"]]:
        for key in ("questions_per_s", "ttft_p50_s", "ttft_p95_s", "tokens_per_s", "peak_mb_per_active_request"):
            assert run[key] > 0, key
    assert result["runs"][1]["max_batch"] > 1  # the three questions were decoded together
    single, batched = (run["ttft_breakdown"] for run in result["runs"])
    assert single["later_ttft_p50_s"] > 0 and batched["later_ttft_p50_s"] is None  # 3 questions: all in the first wave
    assert batched["first_wave_ttft_p50_s"] >= batched["prefill_forward_p50_s"] > 0
    assert set(result["goals"]["3"]) == {"throughput_vs_sequential", "ttft_p95_vs_single_p50"}
