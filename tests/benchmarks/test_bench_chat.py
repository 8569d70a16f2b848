"""`kvpacket bench chat` runs end to end on the embedded model (two short turns, one repeat)."""

from __future__ import annotations

import json

from kvpacket_rag.cli import main


def test_bench_chat_writes_both_paths_per_turn(tmp_path):
    out = tmp_path / "chat.json"
    status = main(["bench", "chat", "--turns", "2", "--repeats", "1", "--max-new-tokens", "8", "--threads", "2",
                   "--json", str(out)])
    assert status == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file()
    session, plain = result["turns"], result["no_reuse"]["turns"]
    assert [row["turn"] for row in session] == [row["turn"] for row in plain] == [1, 2]
    for row in session + plain:
        assert row["ttft_s"] > 0 and row["forwarded_tokens"] > 0
    assert session[0]["forwarded_tokens"] == plain[0]["forwarded_tokens"]
    assert session[1]["forwarded_tokens"] < plain[1]["forwarded_tokens"]  # the first turn came from the cache
    assert result["same_answers"] and result["session_peak_bytes"] == max(r["session_bytes"] for r in session) > 0


def test_bench_chat_refuses_more_turns_than_questions(capsys):
    assert main(["bench", "chat", "--turns", "99"]) != 0
    assert "--turns must be between 1 and" in capsys.readouterr().err
