"""Contrastive fine-tuning of CLIP on posts (C-CLIP): loss, loop, tower locking, LoRA, checkpoints, resume, DDP.

>>> from ccclip_widgets.train import fine_tune, FineTuneConfig
>>> result = fine_tune(model, train_posts, FineTuneConfig(epochs=5, lock_text=True), eval_posts=test_posts,
...                    out_dir="runs/c-clip")  # doctest: +SKIP
>>> result.metrics_table()  # doctest: +SKIP

The command line twin is ``ccclip finetune POSTS --model SPEC --out DIR`` (see ``docs/cli.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported lazily (like the package top level), so ``ccclip finetune --help`` can read the config's flags
# from .config without importing torch.
_EXPORTS = {
    "find_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint",
    "FineTuneConfig": "config",
    "LoraSettings": "config",
    "TowerLayout": "freeze",
    "tower_layouts": "freeze",
    "EvalInfo": "results",
    "EvalVectors": "results",
    "FineTuneResult": "results",
    "StepInfo": "results",
    "TrainingDivergedError": "loop",
    "TrainingOutOfMemoryError": "results",
    "evaluate_in_memory": "evaluation",
    "fine_tune": "loop",
    "merge_lora": "lora",
    "ClipLoss": "loss",
    "metrics_frame": "metrics",
    "retrieval_metrics": "metrics",
}

__all__ = [
    "ClipLoss",
    "EvalInfo",
    "EvalVectors",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
