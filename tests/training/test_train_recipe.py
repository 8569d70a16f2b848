"""The recipe of the shipped adapter is valid, and the shipped adapter is the one it describes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.cli import build_parser
from kvpacket_rag.cli.train import config_from_args
from kvpacket_rag.adapter import SHIPPED_ADAPTERS
from kvpacket_rag.models import DEFAULT_MODEL

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "smollm2_default.py"


def _load_recipe():
    spec = importlib.util.spec_from_file_location("smollm2_default", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smollm2_default = _load_recipe()


def _configs():
    return [config_from_args(build_parser().parse_args(["train", *stage])) for stage in smollm2_default.STAGES]


def test_recipe_stages_are_valid_and_chained():
    configs = _configs()
    assert configs[0].init_adapter is None and configs[0].model is None  # the embedded default model
    for before, after in zip(configs, configs[1:]):
        assert after.init_adapter == before.out and after.teacher_cache == before.teacher_cache
    assert configs[-1].out == SHIPPED_ADAPTERS[DEFAULT_MODEL]
    assert [c.prefix for c in configs] == ["none"] * 3 + ["preamble"] * 8
    assert [c.lora_rank for c in configs] == [0] * 4 + [8] * 7  # the shipped design: build-time LoRA
    assert [c.exact_first for c in configs] == [False] * 9 + [True] * 2  # the last stages train for the default reading
    assert [c.context_tokens for c in configs] == [0] * 9 + [128] * 2
    assert [c.kv_weight for c in configs] == [0.0] * 10 + [10.0]
    assert "squad" not in " ".join(c.data for c in configs)  # the unseen domain stays unseen
    assert all(config.resume for config in configs)
    # checkpoints and logs stay out of the package directory
    assert all(config.run_dir.parent == smollm2_default.RUNS for config in configs)


@pytest.mark.skipif(not SHIPPED_ADAPTERS[DEFAULT_MODEL].is_file(), reason="the shipped adapter is not built yet")
def test_shipped_adapter_matches_its_recipe(default_model):
    adapter = PacketAdapter.load(SHIPPED_ADAPTERS[DEFAULT_MODEL], default_model)
    final = _configs()[-1]
    assert (adapter.n_header, adapter.n_trailer, adapter.prefix) == (final.n_header, final.n_trailer, final.prefix)
    assert adapter.lora is not None and adapter.lora.rank == final.lora_rank
    card = adapter.card
    assert card["data"] == final.data and card["samples"] == final.samples and card["lr"] == final.lr
    assert card["lora_lr"] == final.lora_lr and card["seed"] == final.seed
    assert card["steps"] == final.total_steps and card["final_loss"] > 0
    assert card["exact_first"] == final.exact_first
    assert (card["context_tokens"], card["context_weight"]) == (final.context_tokens, final.context_weight)
    assert card["kv_weight"] == final.kv_weight


@pytest.mark.parametrize("stage", [4, 5, 6, 7, 8, 9, 10])
def test_candidate_stages_match_their_recipe(default_model, stage):
    """The committed adapters of the stages a fresh checkout skips are what their recipe stages train."""
    config = _configs()[stage - 1]
    adapter = PacketAdapter.load(config.out, default_model)
    assert (adapter.lora.rank if adapter.lora else 0) == config.lora_rank and adapter.prefix == config.prefix
    assert adapter.card["steps"] == config.total_steps and adapter.card["data"] == config.data
