"""Training data and settings: mixtures, and clear errors for bad files and bad values."""

from __future__ import annotations

import json

import pytest

from kvpacket_rag.errors import ContextTooLongError, KVPacketError
from kvpacket_rag.prompt import PromptFormatter
from kvpacket_rag.training import TrainConfig, Trainer, TrainingConfigError, TrainingDataError, load_training_samples, tokenize_sample

from kvpacket_rag.testing import make_tiny_model

GOOD = {"chunks": ["Ada was born in Oslo.", "Bob lives in Lima."], "question": "Where was Ada born?"}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_mixture_proportions_and_interleaving(tmp_path):
    data = _write(tmp_path / "mine.jsonl", [json.dumps(GOOD)] * 2)
    samples = load_training_samples(f"biography:3,jsonl:{data}:1", "train", 8, seed=0,
                                    options={"biography": {"docs_per_sample": [2, 3]}})
    kinds = ["bio" if s.id.startswith("biography/") else "mine" for s in samples]
    assert kinds.count("bio") == 6 and kinds.count("mine") == 2
    assert kinds[:2] == ["bio", "mine"] or kinds[:3].count("mine") == 1  # interleaved, not appended
    assert sorted({len(s.chunks) for s in samples if s.id.startswith("biography/")}) == [2, 3]


def test_max_chunks_truncates_context():
    samples = load_training_samples("biography", "train", 3, options={"biography": {"docs_per_sample": 5}},
                                    max_chunks=2)
    assert all(len(s.chunks) == 2 for s in samples)


def test_empty_file_is_a_clear_error(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", [])
    with pytest.raises(TrainingDataError, match="no samples") as info:
        load_training_samples(f"jsonl:{empty}", "train", 1)
    assert isinstance(info.value, KVPacketError)


def test_malformed_line_names_its_line_number(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", '{"chunks": ["x"], "question": '])
    with pytest.raises(TrainingDataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_training_samples(str(bad), "train", 1)
    missing = _write(tmp_path / "missing.jsonl", [json.dumps(GOOD), json.dumps({"chunks": ["x"]})])
    with pytest.raises(TrainingDataError, match=r"missing\.jsonl:2: field 'question'"):
        load_training_samples(str(missing), "train", 1)


def test_bad_specs_are_clear_errors(tmp_path):
    with pytest.raises(TrainingDataError, match="positive weights"):
        load_training_samples("biography:-1", "train", 2)
    with pytest.raises(TrainingDataError, match="unknown dataset 'wikipedia'"):
        load_training_samples("wikipedia", "train", 2)
    with pytest.raises(TrainingDataError, match="no such file"):
        load_training_samples(str(tmp_path / "nope.jsonl"), "train", 2)
    with pytest.raises(TrainingDataError, match="bad options"):
        load_training_samples("biography", "train", 2, options={"biography": {"pages": 3}})


def test_chunk_over_the_context_is_a_clear_error(tokenizer, tmp_path):
    model = make_tiny_model("llama", tokenizer, max_position_embeddings=256)
    long_chunk = " ".join(["word"] * 300)
    data = _write(tmp_path / "long.jsonl", [json.dumps(GOOD), json.dumps({"chunks": [long_chunk], "question": "Why?"})])
    config = TrainConfig(out=tmp_path / "a.safetensors", data=str(data), samples=2, answer_cap=4,
                         teacher_cache=tmp_path / "t", progress=False)
    with pytest.raises(ContextTooLongError, match=r"long/2: chunk 0 has \d+ tokens"):
        Trainer(config, model).prepare()


def test_whole_prompt_over_the_context_is_a_clear_error(tokenizer):
    model = make_tiny_model("llama", tokenizer, max_position_embeddings=128)
    formatter = PromptFormatter(model.tokenizer)
    from kvpacket_rag.datasets import Sample

    sample = Sample("s/1", ["Ada was born in Oslo and moved to Lima later in life."] * 4, "Where was Ada born?")
    with pytest.raises(ContextTooLongError, match="fewer chunks"):
        tokenize_sample(sample, formatter, model, n_adapter_tokens=16, answer_cap=64)


@pytest.mark.parametrize("field, value, message", [
    ("samples", 0, "samples"), ("epochs", -1, "epochs"), ("lr", 0.0, "lr"), ("batch_size", 1.5, "batch_size"),
    ("dtype", "int8", "dtype"), ("device", "tpu", "device"), ("teacher_top_k", 0, "teacher_top_k"),
    ("n_header", -1, "n_header"), ("split", "dev", "split"), ("data_options", {"biography": 2}, "data_options"),
])
def test_config_is_validated_at_construction(tmp_path, field, value, message):
    with pytest.raises(TrainingConfigError, match=message):
        TrainConfig(out=tmp_path / "a.safetensors", **{field: value})


def test_config_derived_values(tmp_path):
    with pytest.raises(TrainingConfigError, match="safetensors"):
        TrainConfig(out=tmp_path / "adapter.pt")
    with pytest.raises(TrainingConfigError, match="nothing to train"):
        TrainConfig(out=tmp_path / "a.safetensors", n_header=0, n_trailer=0)
    config = TrainConfig(out=tmp_path / "a.safetensors", samples=10, batch_size=4, epochs=3)
    assert config.steps_per_epoch == 3 and config.total_steps == 9
    assert config.run_dir == tmp_path / "a.run"
    assert config.loader_options("biography") == {"docs_per_sample": [2, 3, 5, 7]}
