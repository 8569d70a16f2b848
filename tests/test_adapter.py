"""PacketAdapter: initialisation, safetensors round trip, fingerprints and foreign models."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import NO_ADAPTER, PacketAdapter
from kvpacket_rag.errors import CorruptPacketError, IncompatiblePacketError

from kvpacket_rag.testing import make_tiny_model


def test_initialisation_matches_embedding_statistics(tiny_llama):
    adapter = PacketAdapter.initialize(tiny_llama, 64, 64, seed=0)
    weight = tiny_llama.model.get_input_embeddings().weight
    both = torch.cat([adapter.header, adapter.trailer])
    assert adapter.header.shape == (64, tiny_llama.hidden_size)
    assert abs(both.mean().item() - weight.mean().item()) < 0.01
    assert abs(both.std().item() / weight.std().item() - 1) < 0.1


def test_save_load_round_trip(tiny_llama, tmp_path):
    adapter = PacketAdapter.initialize(tiny_llama, 8, 8)
    adapter.card["note"] = "hello"
    path = adapter.save(tmp_path / "a.safetensors")
    assert path.with_suffix(".json").is_file()
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the serving user, like a model file
    loaded = PacketAdapter.load(path, tiny_llama)
    assert loaded.fingerprint == adapter.fingerprint and loaded.card["note"] == "hello"
    assert torch.equal(loaded.header, adapter.header)


def test_empty_adapter_fingerprint(tiny_llama):
    assert PacketAdapter.empty(tiny_llama).fingerprint == NO_ADAPTER


def test_adapter_of_another_model_is_refused(tiny_llama, tokenizer, tmp_path):
    other = make_tiny_model("llama", tokenizer, seed=7)
    path = PacketAdapter.initialize(other, 4, 4).save(tmp_path / "other.safetensors")
    with pytest.raises(IncompatiblePacketError, match="kvpacket train"):
        PacketAdapter.load(path, tiny_llama)


def test_corrupt_adapter_file(tiny_llama, tmp_path):
    path = PacketAdapter.initialize(tiny_llama, 4, 4).save(tmp_path / "a.safetensors")
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPacketError):
        PacketAdapter.load(path, tiny_llama)
    path.write_bytes(b"garbage")
    with pytest.raises(CorruptPacketError):
        PacketAdapter.load(path, tiny_llama)
