"""PacketAdapter: initialisation, safetensors round trip, fingerprints and foreign models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kvpacket_rag.adapter import NO_ADAPTER, PacketAdapter
from kvpacket_rag.errors import CorruptPacketError, IncompatiblePacketError

from kvpacket_rag.testing import make_lora_adapter, make_tiny_model


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


def _write(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def test_preamble_prefix_round_trip_and_fingerprint(tiny_llama, tmp_path):
    plain = PacketAdapter.initialize(tiny_llama, 4, 4, seed=5)
    prefixed = PacketAdapter.initialize(tiny_llama, 4, 4, seed=5, prefix="preamble")
    assert plain.fingerprint != prefixed.fingerprint  # same tensors, other packets
    assert PacketAdapter.empty(tiny_llama, prefix="preamble").fingerprint != NO_ADAPTER
    loaded = PacketAdapter.load(prefixed.save(tmp_path / "p.safetensors"), tiny_llama)
    assert loaded.prefix == "preamble" and loaded.fingerprint == prefixed.fingerprint


def test_format_1_adapter_file_still_loads(tiny_llama, tmp_path):
    """Files written before the packet prefix existed load as prefix "none" with their old fingerprint."""
    adapter = PacketAdapter.initialize(tiny_llama, 3, 2, seed=4)
    tensors = {"header": adapter.header.detach(), "trailer": adapter.trailer.detach()}
    path = _write(tmp_path / "v1.safetensors", tensors, {"format": "kvpacket-adapter/1", "card": "{}",
                  "model_fingerprint": tiny_llama.fingerprint, "fingerprint": adapter.fingerprint})
    loaded = PacketAdapter.load(path, tiny_llama)
    assert loaded.prefix == "none" and loaded.fingerprint == adapter.fingerprint


def test_format_2_adapter_file_still_loads(tiny_llama, tmp_path):
    """Files written before build-time LoRA existed keep their prefix and fingerprint."""
    adapter = PacketAdapter.initialize(tiny_llama, 3, 2, seed=4, prefix="preamble")
    tensors = {"header": adapter.header.detach(), "trailer": adapter.trailer.detach()}
    path = _write(tmp_path / "v2.safetensors", tensors, {"format": "kvpacket-adapter/2", "card": "{}", "prefix": "preamble",
                  "model_fingerprint": tiny_llama.fingerprint, "fingerprint": adapter.fingerprint})
    loaded = PacketAdapter.load(path, tiny_llama)
    assert loaded.prefix == "preamble" and loaded.lora is None and loaded.fingerprint == adapter.fingerprint


def test_build_lora_round_trip_and_fingerprint(tiny_llama, tmp_path):
    adapter = make_lora_adapter(tiny_llama)
    assert adapter.fingerprint != adapter.with_lora(None).fingerprint
    loaded = PacketAdapter.load(adapter.save(tmp_path / "lora.safetensors"), tiny_llama)
    assert loaded.fingerprint == adapter.fingerprint and loaded.lora.rank == 2
    for name, tensor in adapter.lora.tensors().items():
        torch.testing.assert_close(loaded.lora.tensors()[name], tensor, rtol=0, atol=0)
    assert loaded.with_prefix("none").lora is not None  # a prefix change keeps the build weights


def test_build_lora_for_another_shape_is_refused(tiny_llama, tokenizer, tmp_path):
    path = make_lora_adapter(tiny_llama).save(tmp_path / "lora.safetensors")
    wider = make_tiny_model("llama", tokenizer, seed=0, num_key_value_heads=1)
    adapter = PacketAdapter.load(path)
    adapter.model_fingerprint = wider.fingerprint  # same name, other shapes: the weights themselves must not fit
    with pytest.raises(IncompatiblePacketError, match="build-time weights"):
        adapter.check_model(wider)


def test_build_lora_without_scale_is_corrupt(tiny_llama, tmp_path):
    adapter = make_lora_adapter(tiny_llama)
    tensors = {"header": adapter.header.detach(), "trailer": adapter.trailer.detach(), **adapter.lora.tensors()}
    path = _write(tmp_path / "noalpha.safetensors", tensors, {"format": "kvpacket-adapter/3", "card": "{}",
                  "prefix": "preamble", "model_fingerprint": tiny_llama.fingerprint, "fingerprint": adapter.fingerprint})
    with pytest.raises(CorruptPacketError, match="malformed"):
        PacketAdapter.load(path, tiny_llama)


@pytest.mark.parametrize("change, message", [
    ({"model_fingerprint": ""}, "which model"),
    ({"card": "[1, 2"}, "malformed"),
    ({"card": "[1, 2]"}, "malformed"),
    ({"prefix": "everything"}, "malformed"),
    ({"format": "kvpacket-adapter/9"}, "newer kvpacket-rag"),
    ({"format": "something-else"}, "not a kvpacket adapter"),
])
def test_bad_adapter_metadata_is_a_clear_error(tiny_llama, tmp_path, change, message):
    adapter = PacketAdapter.initialize(tiny_llama, 2, 2, prefix="preamble")
    metadata = {"format": "kvpacket-adapter/2", "card": "{}", "prefix": "preamble",
                "model_fingerprint": tiny_llama.fingerprint, "fingerprint": adapter.fingerprint, **change}
    path = _write(tmp_path / "bad.safetensors", {"header": adapter.header.detach(), "trailer": adapter.trailer.detach()},
                  metadata)
    with pytest.raises(CorruptPacketError, match=message):
        PacketAdapter.load(path, tiny_llama)


def test_integer_adapter_tensors_are_refused(tiny_llama, tmp_path):
    ints = torch.zeros(2, tiny_llama.hidden_size, dtype=torch.int32)
    path = _write(tmp_path / "int.safetensors", {"header": ints, "trailer": ints.clone()},
                  {"format": "kvpacket-adapter/2", "model_fingerprint": tiny_llama.fingerprint, "fingerprint": "x"})
    with pytest.raises(CorruptPacketError, match="floating point"):
        PacketAdapter.load(path, tiny_llama)


def test_resolve_adapter_names_default_none_files_and_preamble(tiny_llama, tmp_path):
    from kvpacket_rag.adapter import resolve_adapter

    assert resolve_adapter(tiny_llama, None).fingerprint == resolve_adapter(tiny_llama, "none").fingerprint == "none"
    bare = resolve_adapter(tiny_llama, "none+preamble")
    assert (bare.n_header, bare.n_trailer, bare.prefix) == (0, 0, "preamble")
    trained = PacketAdapter.initialize(tiny_llama, 2, 3, seed=6)
    trained.save(tmp_path / "a.safetensors")
    assert resolve_adapter(tiny_llama, str(tmp_path / "a.safetensors")).fingerprint == trained.fingerprint
    assert resolve_adapter(tiny_llama, f"{tmp_path / 'a.safetensors'}+preamble").fingerprint == \
        trained.with_prefix("preamble").fingerprint
    assert resolve_adapter(tiny_llama, trained) is trained
    with pytest.raises(IncompatiblePacketError, match="no trained adapter ships"):
        resolve_adapter(tiny_llama, "default")


def test_save_pretrained_folder_round_trip(tiny_llama, tmp_path):
    from kvpacket_rag.adapter import resolve_adapter

    adapter = PacketAdapter.initialize(tiny_llama, 4, 4, seed=6, prefix="preamble")
    adapter.card = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "samples": 384}
    folder = adapter.save_pretrained(tmp_path / "hub")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: kvpacket-rag") and adapter.fingerprint in card and "samples: 384" in card
    for loaded in (PacketAdapter.from_pretrained(folder, tiny_llama), resolve_adapter(tiny_llama, str(folder))):
        assert loaded.fingerprint == adapter.fingerprint and loaded.prefix == "preamble"


def test_from_pretrained_without_folder_or_network_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        PacketAdapter.from_pretrained("someone/no-such-adapter", tiny_llama)


def test_shipped_adapter_is_found_for_the_same_weights_under_another_name(tiny_llama, tmp_path, monkeypatch):
    from kvpacket_rag import adapter as adapter_module

    shipped = PacketAdapter.initialize(tiny_llama, 4, 4, seed=8).save(tmp_path / "shipped.safetensors")
    monkeypatch.setitem(adapter_module.SHIPPED_ADAPTERS, "org/tiny", shipped)
    assert adapter_module.shipped_adapter("org/tiny") == shipped
    assert tiny_llama.name != "org/tiny" and adapter_module.shipped_adapter(tiny_llama) == shipped  # by fingerprint
    loaded = adapter_module.resolve_adapter(tiny_llama, "default")
    assert loaded.fingerprint == PacketAdapter.load(shipped).fingerprint


def test_grown_keeps_the_tokens_next_to_the_chunk_and_the_lora(tiny_llama):
    adapter = make_lora_adapter(tiny_llama, n_soft=2)
    grown = adapter.grown(tiny_llama, 5, 3, seed=1)
    assert (grown.n_header, grown.n_trailer, grown.prefix) == (5, 3, adapter.prefix)
    assert torch.equal(grown.header[3:], adapter.header) and torch.equal(grown.trailer[:2], adapter.trailer)
    for name, tensor in adapter.lora.tensors().items():
        assert torch.equal(grown.lora.tensors()[name], tensor)
    assert adapter.grown(tiny_llama, 2, 2).fingerprint == adapter.fingerprint
    with pytest.raises(ValueError, match="only grow"):
        adapter.grown(tiny_llama, 1, 2)


def test_calibration_round_trip_and_fingerprint(tiny_llama, tmp_path):
    adapter = make_lora_adapter(tiny_llama)
    calibrated = adapter.with_calibration([[5, 6, 7], [8]], card={"calibration": "test"})
    assert calibrated.fingerprint not in {adapter.fingerprint, adapter.with_calibration([[5, 6, 7]]).fingerprint}
    path = calibrated.save(tmp_path / "calibrated.safetensors")
    loaded = PacketAdapter.load(path, tiny_llama)
    assert loaded.calibration == ((5, 6, 7), (8,)) and loaded.fingerprint == calibrated.fingerprint
    assert loaded.lora is not None and loaded.card["calibration"] == "test"
    assert json.loads(path.with_suffix(".json").read_text())["calibration_tokens"] == [3, 1]
    with safe_open(str(adapter.save(tmp_path / "plain.safetensors")), "pt") as handle:
        assert handle.metadata()["format"] == "kvpacket-adapter/3"  # files without calibration keep format 3
    assert not PacketAdapter.empty(tiny_llama, "preamble").with_calibration([[5]]).is_empty


def test_bad_calibration_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="prefix='preamble'"):
        PacketAdapter.empty(tiny_llama).with_calibration([[5]]).with_prefix("none")
    with pytest.raises(ValueError, match="non-empty"):
        PacketAdapter.empty(tiny_llama, "preamble").with_calibration([[]])
    beyond = PacketAdapter.empty(tiny_llama, "preamble").with_calibration([[10 ** 6]])
    beyond.model_fingerprint = tiny_llama.fingerprint
    with pytest.raises(IncompatiblePacketError, match="vocabulary"):
        beyond.check_model(tiny_llama)
    adapter = PacketAdapter.initialize(tiny_llama, 2, 2, prefix="preamble").with_calibration([[5, 6]])
    for calibration in ({"calibration.0": torch.tensor([5.0])}, {"calibration.1": torch.tensor([5])}):
        tensors = {"header": adapter.header.detach(), "trailer": adapter.trailer.detach(), **calibration}
        path = _write(tmp_path / "bad.safetensors", tensors, {"format": "kvpacket-adapter/4", "card": "{}",
                      "prefix": "preamble", "model_fingerprint": tiny_llama.fingerprint,
                      "fingerprint": adapter.fingerprint})
        with pytest.raises(CorruptPacketError, match="malformed"):
            PacketAdapter.load(path, tiny_llama)
