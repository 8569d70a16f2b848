"""Averaging adapters (library and `kvpacket average-adapters`): element-wise means of soft tokens and low-rank
factors, refused across layouts."""

from __future__ import annotations

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.cli import main
from kvpacket_rag.testing import make_lora_adapter
from kvpacket_rag.training.averaging import AdapterAveragingError, average_adapters


def _adapter(model, seed: int, n: int = 2, prefix: str = "preamble", lora: bool = True) -> PacketAdapter:
    adapter = make_lora_adapter(model, seed, n, prefix)
    return adapter if lora else adapter.with_lora(None)


def test_average_is_the_element_wise_mean_and_round_trips(tiny_llama, tmp_path):
    a, b, c = (_adapter(tiny_llama, seed) for seed in range(3))
    mean = average_adapters([a, b, c])
    torch.testing.assert_close(mean.header, (a.header + b.header + c.header) / 3)
    torch.testing.assert_close(mean.trailer, (a.trailer + b.trailer + c.trailer) / 3)
    factors = [x.lora.tensors() for x in (a, b, c)]
    for name, tensor in mean.lora.tensors().items():
        torch.testing.assert_close(tensor, sum(f[name] for f in factors) / 3)
    assert (mean.prefix, mean.lora.rank, mean.lora.alpha) == ("preamble", 2, a.lora.alpha)
    assert mean.card["averaged_from"] == [a.fingerprint, b.fingerprint, c.fingerprint]
    loaded = PacketAdapter.load(mean.save(tmp_path / "mean.safetensors"), tiny_llama)
    assert loaded.fingerprint == mean.fingerprint


def test_average_of_copies_is_the_adapter_itself(tiny_llama):
    adapter = _adapter(tiny_llama, 0)
    assert average_adapters([adapter, adapter]).fingerprint == adapter.fingerprint
    plain = _adapter(tiny_llama, 1, lora=False)
    assert average_adapters([plain, plain], card={}).fingerprint == plain.fingerprint


@pytest.mark.parametrize("other, field", [(dict(n=3), "header size, trailer size"), (dict(prefix="none"), "prefix"),
                                          (dict(lora=False), "build-time LoRA")])
def test_adapters_of_different_layouts_are_refused(tiny_llama, other, field):
    with pytest.raises(AdapterAveragingError, match=f"these differ: {field}"):
        average_adapters([_adapter(tiny_llama, 0), _adapter(tiny_llama, 1, **other)])


def test_calibrated_adapters_average_with_their_contexts(tiny_llama):
    one, two = (_adapter(tiny_llama, seed).with_calibration([[5, 6]]) for seed in (0, 1))
    assert average_adapters([one, two]).calibration == ((5, 6),)
    with pytest.raises(AdapterAveragingError, match="these differ: calibration contexts"):
        average_adapters([one, _adapter(tiny_llama, 1)])


def test_adapters_of_another_model_are_refused(tiny_llama):
    other = _adapter(tiny_llama, 1)
    other.model_fingerprint = "another-model"
    with pytest.raises(AdapterAveragingError, match="these differ: model$"):
        average_adapters([_adapter(tiny_llama, 0), other])


def test_one_adapter_is_refused(tiny_llama):
    with pytest.raises(AdapterAveragingError, match="at least two"):
        average_adapters([_adapter(tiny_llama, 0)])


def test_kvpacket_average_adapters_writes_the_mean(tiny_llama, tmp_path, capsys):
    paths = [_adapter(tiny_llama, seed).save(tmp_path / f"{seed}.safetensors") for seed in range(2)]
    out = tmp_path / "mean.safetensors"
    assert main(["average-adapters", *map(str, paths), "--out", str(out)]) == 0
    assert "adapter written to" in capsys.readouterr().err
    expected = average_adapters([PacketAdapter.load(path) for path in paths])
    assert PacketAdapter.load(out, tiny_llama).fingerprint == expected.fingerprint


def test_kvpacket_average_adapters_reports_mismatched_adapters(tiny_llama, tmp_path, capsys):
    paths = [_adapter(tiny_llama, 0).save(tmp_path / "a.safetensors"),
             _adapter(tiny_llama, 1, n=3).save(tmp_path / "b.safetensors")]
    out = tmp_path / "mean.safetensors"
    assert main(["average-adapters", *map(str, paths), "--out", str(out)]) == 2
    assert "these differ: header size, trailer size" in capsys.readouterr().err and not out.exists()
