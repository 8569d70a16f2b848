"""`kvpacket train` end to end on a tiny model saved to disk, and its error path."""

from __future__ import annotations

import json

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.cli import main
from kvpacket_rag.models import load_model


def test_kvpacket_train_writes_adapter_and_card(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"chunks": [f"Item {i} is red.", f"Item {i} weighs {i} kg."],
                                          "question": f"What colour is item {i}?"}) for i in range(4)) + "\n")
    out = tmp_path / "adapter.safetensors"
    status = main(["train", "--model", str(model_dir), "--data", f"jsonl:{data}", "--samples", "4", "--epochs", "2",
                   "--batch-size", "2", "--n-header", "2", "--n-trailer", "2", "--answer-cap", "3", "--threads", "1",
                   "--teacher-cache", str(tmp_path / "teacher"), "--no-progress", "--out", str(out)])
    assert status == 0
    assert "adapter written to" in capsys.readouterr().err
    adapter = PacketAdapter.load(out, load_model(str(model_dir)))
    assert adapter.n_header == 2 and adapter.card["steps"] == 4 and adapter.card["model"] == str(model_dir)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["samples"] == 4 and card["epochs"] == 2 and "final_loss" in card and "wall_time_s" in card


def test_kvpacket_train_reports_bad_data(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    status = main(["train", "--data", str(empty), "--samples", "1", "--out", str(tmp_path / "a.safetensors"),
                   "--no-progress"])
    assert status == 2
    assert "empty.jsonl: file has no samples" in capsys.readouterr().err
