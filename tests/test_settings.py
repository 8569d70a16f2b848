"""Engine settings: keyword arguments first, then KVPACKET_* environment variables, then defaults."""

from __future__ import annotations

import pytest

from kvpacket_rag.settings import ENVIRONMENT, EngineSettings, from_environment


def test_keywords_win_over_the_environment_and_absent_names_come_from_it(monkeypatch):
    for variable in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    assert EngineSettings.resolve() == EngineSettings(None, "default", "cpu", None, None)
    monkeypatch.setenv("KVPACKET_DEVICE", "cuda:1")
    monkeypatch.setenv("KVPACKET_ADAPTER", "none+preamble")
    monkeypatch.setenv("KVPACKET_STORE", "redis://localhost:6379/0")
    monkeypatch.setenv("KVPACKET_DTYPE", "")  # empty: unset
    settings = EngineSettings.resolve(device="cpu")
    assert (settings.device, settings.adapter, settings.store, settings.dtype) == \
        ("cpu", "none+preamble", "redis://localhost:6379/0", None)
    assert EngineSettings.resolve(adapter=None).adapter is None  # given, even as None: bare packets
    assert from_environment({"device": "cpu", "store": None}) == {"adapter": "none+preamble"}
    with pytest.raises(TypeError, match="unknown engine settings"):
        EngineSettings.resolve(modle="x")


def test_a_model_without_a_shipped_adapter_gets_bare_packets_and_chats(tokenizer, tmp_path):
    from kvpacket_rag.generation import GenerationConfig
    from kvpacket_rag.testing import make_tiny_model

    tiny = make_tiny_model("qwen2", tokenizer, seed=1)
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no trained adapter ships"):
        engine = EngineSettings(model=str(tmp_path)).engine()
    assert engine.adapter.fingerprint == "none"
    answer = engine.chat([("user", "Hello")], GenerationConfig(max_new_tokens=3)).collect()
    assert answer.method == "plain" and len(answer.token_ids) <= 3
