"""Calibration contexts: drawing them, calibrating an adapter, and `kvpacket calibrate` end to end."""

from __future__ import annotations

import json

import pytest

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.builder import PacketBuilder
from kvpacket_rag.calibration import CalibrationConfig, calibrate, draw_contexts
from kvpacket_rag.cli import main
from kvpacket_rag.errors import InvalidInputError
from kvpacket_rag.models import load_model
from kvpacket_rag.prompt import PromptFormatter

PASSAGES = [f"Item {i} is a {colour} box of {i} kg." for i, colour in enumerate(["red", "blue", "green", "grey"])]


def test_contexts_join_distinct_passages_and_are_seeded():
    passages = [[1, 2], [3], [4, 5, 6], []]
    contexts = draw_contexts(passages, CalibrationConfig(contexts=5, depth=2, seed=3))
    assert len(contexts) == 5 and contexts == draw_contexts(passages, CalibrationConfig(contexts=5, depth=2, seed=3))
    pieces = {(1, 2), (3,), (4, 5, 6)}
    for ids in contexts:  # two different non-empty passages, in some order
        assert any(tuple(ids[:n]) in pieces and tuple(ids[n:]) in pieces and ids[:n] != ids[n:]
                   for n in range(1, len(ids)))
    with pytest.raises(InvalidInputError, match="at least 4 non-empty passages"):
        draw_contexts(passages, CalibrationConfig(depth=4))


@pytest.mark.parametrize("field, value", [("contexts", 0), ("depth", 0), ("depth", 1.5)])
def test_bad_config_is_refused(field, value):
    with pytest.raises(ValueError, match=f"calibration {field}"):
        CalibrationConfig(**{field: value})


def test_calibrate_keeps_the_adapter_and_records_its_draw(tiny_llama):
    formatter = PromptFormatter(tiny_llama.tokenizer)
    base = PacketAdapter.initialize(tiny_llama, 2, 2, seed=1, prefix="preamble")
    calibrated = calibrate(base, formatter, PASSAGES + ["  "], CalibrationConfig(contexts=3, depth=2), source="test")
    assert len(calibrated.calibration) == 3 and calibrated.n_header == 2
    tokens = {tuple(formatter.chunk_ids(text)) for text in PASSAGES}
    assert all(any(tuple(ids[:n]) in tokens for n in range(1, len(ids))) for ids in calibrated.calibration)
    assert calibrated.card["calibrated_from"] == base.fingerprint
    assert calibrated.card["calibration"] == {"contexts": 3, "depth": 2, "seed": 0, "passages": 4, "source": "test"}
    packet = PacketBuilder(tiny_llama, calibrated, formatter).build("Item 9 is a white box.")
    assert packet.adapter_fingerprint.startswith(calibrated.fingerprint)


def test_kvpacket_calibrate_writes_an_adapter(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"chunks": [text], "question": "Which item?"}) for text in PASSAGES) + "\n")
    out = tmp_path / "calibrated.safetensors"
    status = main(["calibrate", "--model", str(model_dir), "--dataset", f"jsonl:{data}", "--n", "4",
                   "--contexts", "2", "--depth", "3", "--out", str(out)])
    assert status == 0 and "2 contexts of 3 passages from 4 passages" in capsys.readouterr().out
    adapter = PacketAdapter.load(out, load_model(str(model_dir)))
    assert len(adapter.calibration) == 2 and adapter.prefix == "preamble" and adapter.n_header == 0
    assert main(["calibrate", "--model", str(model_dir), "--dataset", f"jsonl:{data}", "--n", "4", "--depth", "5",
                 "--out", str(tmp_path / "x.safetensors")]) == 3
    assert "at least 5 non-empty passages" in capsys.readouterr().err
