"""`kvpacket bench ttft` runs end to end on the embedded model (smallest size, one repeat)."""

from __future__ import annotations

import json

from kvpacket_rag.cli import main


def test_bench_ttft_writes_every_method_and_form(tmp_path):
    out = tmp_path / "ttft.json"
    status = main(["bench", "ttft", "--sizes", "2x128", "--methods", "kv_packet", "full_recompute", "cacheblend:0.15",
                   "--forms", "none", "int8", "--forms-size", "2x128", "--repeats", "1", "--threads", "2",
                   "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    text = json.dumps(result)
    for name in ("kv_packet", "full_recompute", "cacheblend:0.15", "int8"):
        assert name in text
