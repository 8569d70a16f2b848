"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint of step ``s`` is ``checkpoint-<s>.safetensors`` (adapter, AdamW moments and step counts, the
torch RNG state) plus ``checkpoint-<s>.json`` (step, settings signature, log, elapsed time). The JSON file
is written last, so a checkpoint counts only once it exists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvpacket_rag.adapter import PacketAdapter
from kvpacket_rag.fileio import atomic_write

FORMAT = "kvpacket-train-checkpoint/1"
_NAME = re.compile(r"checkpoint-(\d+)\.json$")


@dataclass
class Checkpoint:
    """A restored checkpoint.

    Attributes:
        step: optimizer steps done.
        tensors: ``adapter.<p>``, ``optim.<p>.<state>`` for every adapter parameter p (header, trailer, build
            LoRA), and ``rng.torch``.
        info: the JSON part (``signature``, ``model_fingerprint``, ``log``, ``elapsed_s``, ...).
    """

    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def save_checkpoint(run_dir: Path, step: int, adapter: PacketAdapter, optimizer: torch.optim.Optimizer,
                    info: dict[str, Any], keep: int = 3) -> Path:
    """Write the checkpoint of ``step`` into ``run_dir`` and keep only the newest ``keep``; return the JSON path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"rng.torch": torch.get_rng_state()}
    for name, param in adapter.named_parameters():
        tensors[f"adapter.{name}"] = param.detach().to("cpu", torch.float32).contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    stem = run_dir / f"checkpoint-{step:06d}"
    atomic_write(stem.with_suffix(".safetensors"), lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    text = json.dumps({"format": FORMAT, "step": step, **info}, indent=1, default=str)
    atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem.with_suffix(".json")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (their JSON paths) in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.search(p.name))
             and p.with_suffix(".safetensors").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(json_path: Path) -> Checkpoint:
    """Read one checkpoint (``checkpoint-<step>.json`` and its tensors)."""
    info = json.loads(json_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a kvpacket training checkpoint")
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    return Checkpoint(int(info.pop("step")), tensors, info)


def restore(checkpoint: Checkpoint, adapter: PacketAdapter, optimizer: torch.optim.Optimizer) -> None:
    """Load the adapter values, AdamW state and torch RNG state of ``checkpoint`` in place."""
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            param.copy_(checkpoint.tensors[f"adapter.{name}"].to(param.device))
            prefix = f"optim.{name}."
            state = {k[len(prefix):]: v.to(param.device) if v.dim() else v
                     for k, v in checkpoint.tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[param] = state
    torch.set_rng_state(checkpoint.tensors["rng.torch"])
