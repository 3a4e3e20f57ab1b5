"""Contrastive fine-tuning of CLIP on posts (C-CLIP): loss, loop, tower locking, LoRA, checkpoints, resume, DDP.

>>> from ccclip_widgets.train import fine_tune, FineTuneConfig
>>> result = fine_tune(model, train_posts, FineTuneConfig(epochs=5, lock_text=True), eval_posts=test_posts,
...                    out_dir="runs/c-clip")  # doctest: +SKIP
>>> result.metrics_table()  # doctest: +SKIP

The command line twin is ``ccclip finetune POSTS --model SPEC --out DIR`` (see :mod:`.cli`).
"""

from __future__ import annotations

from .checkpoint import find_checkpoint, list_checkpoints
from .config import FineTuneConfig, LoraSettings
from .freeze import TowerLayout, tower_layouts
from .loop import (
    EvalInfo,
    FineTuneResult,
    StepInfo,
    TrainingDivergedError,
    TrainingOutOfMemoryError,
    evaluate_in_memory,
    fine_tune,
)
from .lora import merge_lora
from .loss import ClipLoss
from .metrics import metrics_frame, retrieval_metrics

__all__ = [
    "ClipLoss",
    "EvalInfo",
    "FineTuneConfig",
    "FineTuneResult",
    "LoraSettings",
    "StepInfo",
    "TowerLayout",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "evaluate_in_memory",
    "find_checkpoint",
    "fine_tune",
    "list_checkpoints",
    "merge_lora",
    "metrics_frame",
    "retrieval_metrics",
    "tower_layouts",
]
