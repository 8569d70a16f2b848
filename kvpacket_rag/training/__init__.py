"""Adapter training for KV packets: self-supervised distillation from full attention.

Example:
    >>> from kvpacket_rag.training import TrainConfig, train
    >>> result = train(TrainConfig(out="my-model.safetensors", model="HuggingFaceTB/SmolLM2-360M-Instruct",
    ...                            data="biography:0.5,hotpotqa:0.5", samples=256, epochs=10))
    >>> result.path, result.final_loss

The command line equivalent is ``kvpacket train --model ... --data ... --out ...``; the recipe of the
shipped default adapter is ``python training/recipes/smollm2_default.py``.
"""

from .averaging import AdapterAveragingError, average_adapters
from .checkpoint import Checkpoint, list_checkpoints, load_checkpoint
from .config import DEFAULT_DATA_OPTIONS, TrainConfig, TrainingConfigError
from .data import TokenizedSample, TrainingDataError, load_training_samples, parse_data_spec, tokenize_sample
from .teacher import TeacherCache, TeacherOutput, teacher_answer, teacher_continuation, teacher_key
from .student import student_logits
from .trainer import Trainer, TrainResult, epoch_order, linear_lr, plot_loss, train

__all__ = [
    "AdapterAveragingError", "Checkpoint", "DEFAULT_DATA_OPTIONS", "TeacherCache", "TeacherOutput", "TokenizedSample",
    "TrainConfig", "TrainResult", "Trainer", "TrainingConfigError", "TrainingDataError", "average_adapters",
    "epoch_order", "linear_lr", "list_checkpoints", "load_checkpoint", "load_training_samples", "parse_data_spec",
    "plot_loss", "student_logits", "teacher_answer", "teacher_continuation", "teacher_key", "tokenize_sample", "train",
]
