"""The optimisation loop on a tiny random model: KL goes down, resume is exact, caches and files are right."""

from __future__ import annotations

import json

import pytest
import torch

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.lora import ALL_TARGETS
from kvpacket_rag.reference import block_forward
from kvpacket_rag.training import TeacherCache, TrainConfig, Trainer, TrainingConfigError, list_checkpoints, student_logits, train
from kvpacket_rag.training.student import kv_match_error, packet_blocks


def _jsonl(path, n=6):
    people = ["Ada", "Bob", "Cyd", "Dee", "Eve", "Fay", "Gus", "Hal"]
    lines = [json.dumps({"chunks": [f"{p} was born in {city}.", f"{p} works at {firm} as an engineer."],
                         "question": f"Where was {p} born?"})
             for p, city, firm in zip(people[:n], ["Oslo", "Lima", "Kyiv", "Pune", "Nice", "Graz"],
                                      ["Acme", "Initech", "Umbrella", "Hooli", "Globex", "Vandelay"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(out=tmp_path / "out" / "adapter.safetensors", data=f"jsonl:{_jsonl(tmp_path / 'd.jsonl')}",
                    samples=6, epochs=2, batch_size=2, lr=3e-2, n_header=4, n_trailer=4, answer_cap=4,
                    teacher_cache=tmp_path / "teacher", checkpoint_every=2, progress=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def _mean_kl(trainer: Trainer, adapter: PacketAdapter) -> float:
    with torch.no_grad():
        kls = [t.kl(student_logits(trainer.model, adapter, trainer.preamble_ids, s, t.answer_ids))
               for s, t in zip(trainer.samples, trainer.teacher)]
    return float(torch.cat(kls).mean())


def test_training_reduces_kl(tiny_llama, tmp_path):
    config = _config(tmp_path, epochs=5, lr=5e-2)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    initial = PacketAdapter.initialize(tiny_llama, 4, 4, seed=config.seed)
    before = _mean_kl(trainer, initial)
    result = trainer.run()
    after = _mean_kl(trainer, result.adapter)
    assert result.finished and result.steps == config.total_steps == 15
    assert after < 0.7 * before, (before, after)
    loaded = PacketAdapter.load(config.out, tiny_llama)
    assert torch.equal(loaded.header, result.adapter.header.detach())
    card = json.loads(config.out.with_suffix(".json").read_text())
    assert card["steps"] == 15 and card["final_loss"] == pytest.approx(result.final_loss)
    assert card["model_fingerprint"] == tiny_llama.fingerprint and card["data"] == config.data
    assert {"wall_time_s", "lr", "batch_size", "epochs", "samples", "n_header"} <= card.keys()
    assert (config.run_dir / "loss.png").stat().st_size > 1000
    log = json.loads((config.run_dir / "log.json").read_text())
    assert [e["step"] for e in log["steps"]] == list(range(1, 16))
    assert log["steps"][-1]["lr"] == pytest.approx(config.lr / 15)  # linear decay towards 0


def test_resume_equals_uninterrupted_run(tiny_llama, tmp_path):
    whole = train(_config(tmp_path / "a"), tiny_llama)
    first = train(_config(tmp_path / "b", stop_after_steps=3), tiny_llama)
    assert not first.finished and first.path is None and first.steps == 3
    assert not (tmp_path / "b" / "out" / "adapter.safetensors").exists()
    second = train(_config(tmp_path / "b", resume=True), tiny_llama)
    assert second.finished and second.steps == whole.steps == 6
    assert torch.equal(second.adapter.header, whole.adapter.header)
    assert torch.equal(second.adapter.trailer, whole.adapter.trailer)
    assert [e["loss"] for e in second.log] == [e["loss"] for e in whole.log]
    files = {p.suffix for p in (tmp_path / "b" / "out" / "adapter.run").iterdir()}
    assert files <= {".safetensors", ".json", ".png"}  # no pickle anywhere


def test_resume_refuses_changed_settings_and_fresh_run_refuses_old_checkpoints(tiny_llama, tmp_path):
    train(_config(tmp_path, stop_after_steps=2), tiny_llama)
    assert list_checkpoints(tmp_path / "out" / "adapter.run")
    with pytest.raises(TrainingConfigError, match="lr"):
        train(_config(tmp_path, lr=1e-3, resume=True), tiny_llama)
    with pytest.raises(TrainingConfigError, match="resume"):
        train(_config(tmp_path), tiny_llama)


def test_checkpoint_written_before_lora_targets_existed_still_resumes(tiny_llama, tmp_path):
    """A checkpoint whose settings lack ``lora_targets`` meant the attention projections: it resumes with them
    and is refused with any other targets."""
    train(_config(tmp_path, stop_after_steps=2, lora_rank=2), tiny_llama)
    for path in list_checkpoints(tmp_path / "out" / "adapter.run"):
        info = json.loads(path.read_text())
        del info["signature"]["lora_targets"]
        path.write_text(json.dumps(info))
    with pytest.raises(TrainingConfigError, match="lora_targets"):
        train(_config(tmp_path, resume=True, lora_rank=2, lora_targets=ALL_TARGETS), tiny_llama)
    assert train(_config(tmp_path, resume=True, lora_rank=2), tiny_llama).finished


def test_warm_start_from_an_adapter_file(tiny_llama, tmp_path):
    start = PacketAdapter.initialize(tiny_llama, 4, 4, seed=11)
    start.save(tmp_path / "start.safetensors")
    config = _config(tmp_path, init_adapter=tmp_path / "start.safetensors", stop_after_steps=1)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    assert torch.equal(trainer._initial_adapter().header, start.header.detach())
    moved = trainer.run().adapter
    assert not torch.equal(moved.header, start.header)
    with pytest.raises(TrainingConfigError, match="soft tokens"):
        Trainer(_config(tmp_path / "b", init_adapter=tmp_path / "start.safetensors", n_header=2), tiny_llama).run()


def test_warm_start_grows_a_smaller_adapter(tiny_llama, tmp_path):
    """More soft tokens than the starting adapter: new ones go before the header and after the trailer."""
    start = PacketAdapter.initialize(tiny_llama, 2, 3, seed=11)
    start.save(tmp_path / "start.safetensors")
    trainer = Trainer(_config(tmp_path, init_adapter=tmp_path / "start.safetensors", stop_after_steps=1), tiny_llama)
    trainer.prepare()
    grown = trainer._initial_adapter()
    assert (grown.n_header, grown.n_trailer) == (4, 4)
    assert torch.equal(grown.header[2:], start.header) and torch.equal(grown.trailer[:3], start.trailer)
    assert trainer.run().adapter.n_header == 4 and trainer.init_fingerprint == start.fingerprint


def test_training_for_first_exact_reads_the_first_chunk_plainly(tiny_llama, tmp_path):
    config = _config(tmp_path, prefix="preamble", exact_first=True, epochs=1)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    adapter = PacketAdapter.initialize(tiny_llama, 4, 4, seed=3, prefix="preamble")
    sample, teacher = trainer.samples[0], trainer.teacher[0]
    with torch.no_grad():
        got, no_context, no_kv = trainer._student_logits(adapter, sample, teacher, None)
        want = student_logits(tiny_llama, adapter, trainer.preamble_ids, sample, teacher.answer_ids, exact_first=True)
        packets = student_logits(tiny_llama, adapter, trainer.preamble_ids, sample, teacher.answer_ids)
    torch.testing.assert_close(got, want)
    assert no_context is None and no_kv is None
    assert len(sample.chunk_ids) == 2 and (got - packets).abs().max() > 1e-4  # the first chunk is read otherwise
    assert trainer.run().finished
    assert json.loads(config.out.with_suffix(".json").read_text())["exact_first"] is True


def test_context_loss_reads_the_last_chunk_after_the_other_packets(tiny_llama, tmp_path):
    config = _config(tmp_path, prefix="preamble", context_tokens=5, epochs=1)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    adapter = PacketAdapter.initialize(tiny_llama, 4, 4, seed=3, prefix="preamble")
    sample, teacher, context = trainer.samples[0], trainer.teacher[0], trainer.context_teacher[0]
    chunks = [list(ids) for ids in sample.chunk_ids]
    tail = chunks[-1][:5]
    assert torch.equal(context.answer_ids, torch.tensor(tail[1:]))
    prompt = trainer.preamble_ids + chunks[0] + tail  # full recompute of the chunks before, then the tail
    with torch.no_grad():
        full = torch.log_softmax(tiny_llama.model(input_ids=torch.tensor([prompt])).logits[0, -5:-1].float(), -1)
        answer, got, _ = trainer._student_logits(adapter, sample, teacher, context)
        want = block_forward(tiny_llama, adapter, trainer.preamble_ids, chunks[:-1], tail[:-1], 4)
    torch.testing.assert_close(context.logprobs, full, atol=1e-5, rtol=1e-4)
    assert len(list((tmp_path / "teacher").rglob("*.safetensors"))) == 12  # an answer and a context per sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # the packet path equals the block-mask forward
    torch.testing.assert_close(answer, student_logits(tiny_llama, adapter, trainer.preamble_ids, sample,
                                                      teacher.answer_ids))
    result = trainer.run()
    log = json.loads((config.run_dir / "log.json").read_text())["steps"]
    assert result.finished and all(entry["context_loss"] > 0 for entry in log)
    card = json.loads(config.out.with_suffix(".json").read_text())
    assert card["context_tokens"] == 5 and "last chunk" in card["loss"]
    exact_first = Trainer(_config(tmp_path / "b", prefix="preamble", context_tokens=5, exact_first=True), tiny_llama)
    exact_first.prepare()  # two chunks, the first read exactly: no packet precedes the last chunk
    assert exact_first.context_teacher == [None] * 6


def test_kv_loss_adds_the_packets_key_value_error_to_the_steps(tiny_llama, tmp_path):
    config = _config(tmp_path, prefix="preamble", kv_weight=0.5, epochs=1)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    adapter = PacketAdapter.initialize(tiny_llama, 4, 4, seed=3, prefix="preamble")
    sample, teacher = trainer.samples[0], trainer.teacher[0]
    with torch.no_grad():
        answer, _, kv_error = trainer._student_logits(adapter, sample, teacher, None)
        pieces = packet_blocks(tiny_llama, adapter, trainer.preamble, [list(c) for c in sample.chunk_ids])
        want = kv_match_error(tiny_llama, pieces, sample.chunk_ids, 4)
    torch.testing.assert_close(kv_error, want)
    torch.testing.assert_close(answer, student_logits(tiny_llama, adapter, trainer.preamble_ids, sample,
                                                      teacher.answer_ids))
    result = trainer.run()
    assert result.finished and all(entry["kv_error"] > 0 for entry in result.log)
    card = json.loads(config.out.with_suffix(".json").read_text())
    assert card["kv_weight"] == 0.5 and "keys/values" in card["loss"]
    with pytest.raises(TrainingConfigError, match="kv_weight"):
        _config(tmp_path, kv_weight=1.0, gradient_checkpointing=True)
    with pytest.raises(TrainingConfigError, match="kv_weight"):
        _config(tmp_path, kv_weight=-1.0)


def test_context_loss_under_gradient_checkpointing_gives_the_same_steps(tiny_llama, tmp_path):
    runs = [train(_config(tmp_path / name, epochs=1, context_tokens=4, gradient_checkpointing=on), tiny_llama)
            for name, on in (("a", False), ("b", True))]
    torch.testing.assert_close(runs[1].adapter.header, runs[0].adapter.header, atol=1e-5, rtol=1e-4)
    assert [e["context_loss"] for e in runs[1].log] == pytest.approx([e["context_loss"] for e in runs[0].log],
                                                                     rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("setting", [{"context_tokens": 1}, {"context_tokens": -2}, {"context_weight": 0.0}])
def test_context_loss_settings_are_validated(tmp_path, setting):
    with pytest.raises(TrainingConfigError, match="context_"):
        _config(tmp_path, **setting)


def test_teacher_outputs_are_cached_on_disk(tiny_llama, tmp_path):
    config = _config(tmp_path, teacher_top_k=16)
    first = Trainer(config, tiny_llama)
    first.prepare()
    files = sorted((tmp_path / "teacher").rglob("*.safetensors"))
    assert len(files) == 6
    stamps = [f.stat().st_mtime_ns for f in files]
    second = Trainer(config, tiny_llama)
    second.prepare()
    assert [f.stat().st_mtime_ns for f in files] == stamps
    for a, b in zip(first.teacher, second.teacher):
        assert torch.equal(a.answer_ids, b.answer_ids) and torch.equal(a.top_logprobs, b.top_logprobs)
        assert a.logprobs is None and a.top_ids.shape == (a.length, 16)
    files[0].write_bytes(b"truncated")  # an unreadable entry is recomputed, not fatal
    assert TeacherCache(tmp_path / "teacher").get(files[0].stem) is None
    third = Trainer(config, tiny_llama)
    third.prepare()
    assert any(torch.equal(t.answer_ids, first.teacher[0].answer_ids) for t in third.teacher)


def test_gradient_checkpointing_gives_the_same_steps(tiny_llama, tmp_path, monkeypatch):
    mlp, calls = tiny_llama.model.model.layers[0].mlp, []
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: calls.append(1) or forward(x))  # hooks skip the recompute
    trainers = [Trainer(_config(tmp_path / name, epochs=1, gradient_checkpointing=on), tiny_llama)
                for name, on in (("a", False), ("b", True))]
    counts = []
    for trainer in trainers:
        trainer.prepare()
        calls.clear()
        counts.append((trainer.run(), len(calls)))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = counts
    # checkpointed: one block-mask forward per sample (6), each run again in the backward pass; plain: the
    # per-chunk student, one forward per chunk and one for the tail, never rerun
    assert checkpointed_calls == 12 and plain_calls > 6
    torch.testing.assert_close(checkpointed.adapter.header, plain.adapter.header, atol=1e-5, rtol=1e-4)
    assert not tiny_llama.model.training
    assert not any(getattr(m, "gradient_checkpointing", False) for m in tiny_llama.model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_reduces_loss(tokenizer, tmp_path):
    from kvpacket_rag.testing import make_tiny_model

    model = make_tiny_model("llama", tokenizer, dtype=torch.bfloat16)
    model.model.to("cuda")
    result = train(_config(tmp_path, epochs=5, lr=5e-2, device="cuda"), model)
    assert result.adapter.header.dtype == torch.float32 and result.adapter.header.device.type == "cuda"
    losses = [e["loss"] for e in result.log]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_preamble_prefix_training_writes_a_preamble_adapter(tiny_llama, tmp_path):
    """Warm start from a position-0 adapter into packets built after the preamble: the run trains that layout."""
    start = PacketAdapter.initialize(tiny_llama, 4, 4, seed=2).save(tmp_path / "start.safetensors")
    config = _config(tmp_path, prefix="preamble", init_adapter=start, epochs=3, lr=5e-2)
    trainer = Trainer(config, tiny_llama)
    trainer.prepare()
    result = trainer.run()
    loaded = PacketAdapter.load(config.out, tiny_llama)
    assert loaded.prefix == "preamble" and loaded.card["prefix"] == "preamble"
    assert not torch.equal(loaded.header, PacketAdapter.load(start, tiny_llama).header)  # it trained
    assert loaded.fingerprint != PacketAdapter(loaded.header, loaded.trailer, loaded.model_fingerprint).fingerprint


def test_build_lora_trains_resumes_exactly_and_loads(tiny_llama, tmp_path):
    """Build-time low-rank updates learn beside the soft tokens (their own lr), resume exactly and are saved."""
    settings = dict(lora_rank=2, lora_lr=1e-2)
    whole = train(_config(tmp_path / "a", **settings), tiny_llama)
    train(_config(tmp_path / "b", stop_after_steps=3, **settings), tiny_llama)
    second = train(_config(tmp_path / "b", resume=True, **settings), tiny_llama)
    assert [e["loss"] for e in second.log] == [e["loss"] for e in whole.log]
    for name, tensor in whole.adapter.lora.tensors().items():
        assert torch.equal(second.adapter.lora.tensors()[name], tensor)
    assert any(up.abs().max().item() > 0 for up in whole.adapter.lora.up.values())  # it moved from B = 0
    loaded = PacketAdapter.load(whole.path, tiny_llama)
    assert loaded.fingerprint == whole.adapter.fingerprint and loaded.card["lora_rank"] == 2
    with pytest.raises(TrainingConfigError, match="lora_rank"):
        train(_config(tmp_path / "b", resume=True, lora_rank=4), tiny_llama)


def test_build_lora_of_a_start_adapter_gains_new_targets_at_zero(tiny_llama, tmp_path):
    """Warm-starting with more target layers keeps the start's updates and adds the others at B = 0, so the
    first loss is the start adapter's own; training then moves the added layers."""
    attention = train(_config(tmp_path / "a", lora_rank=2, lora_lr=1e-2), tiny_llama)
    widened = _config(tmp_path / "b", lora_rank=2, lora_lr=1e-2, init_adapter=attention.path, epochs=1,
                      lora_targets=ALL_TARGETS)
    trainer = Trainer(widened, tiny_llama)
    trainer.prepare()
    first = trainer._initial_adapter()
    assert first.lora.targets == ALL_TARGETS
    assert _mean_kl(trainer, first) == pytest.approx(_mean_kl(trainer, attention.adapter), abs=1e-6)
    for name, tensor in attention.adapter.lora.tensors().items():
        assert torch.equal(first.lora.tensors()[name], tensor)
    result = trainer.run()
    mlp_up = [up for key, up in result.adapter.lora.up.items() if key.endswith("mlp/up_proj")]
    assert mlp_up and any(up.abs().max().item() > 0 for up in mlp_up)
    loaded = PacketAdapter.load(result.path, tiny_llama)
    assert loaded.lora.targets == ALL_TARGETS and loaded.card["lora_targets"] == list(ALL_TARGETS)
    with pytest.raises(TrainingConfigError, match="lora_targets"):
        _config(tmp_path / "c", lora_targets=("q_proj", "lm_head"))


def test_warm_start_from_a_calibrated_adapter_is_refused(tiny_llama, tmp_path):
    start = PacketAdapter.initialize(tiny_llama, 4, 4, seed=11, prefix="preamble").with_calibration([[5, 6]])
    start.save(tmp_path / "start.safetensors")
    with pytest.raises(TrainingConfigError, match="calibration contexts"):
        Trainer(_config(tmp_path, init_adapter=tmp_path / "start.safetensors", stop_after_steps=1), tiny_llama).run()
