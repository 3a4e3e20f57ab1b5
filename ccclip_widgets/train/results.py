"""What a fine-tuning run reports: :class:`StepInfo`, :class:`EvalInfo` (with :class:`EvalVectors`),
:class:`FineTuneResult`, and :class:`TrainingOutOfMemoryError`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ..errors import CCClipError
from ..models import ClipModel
from .config import FineTuneConfig
from .metrics import metrics_frame


class TrainingOutOfMemoryError(CCClipError, torch.cuda.OutOfMemoryError):
    """The GPU ran out of memory; the message says what to change."""


@dataclass(frozen=True)
class StepInfo:
    """What happened in one optimizer step (passed to ``on_step``).

    Attributes
    ----------
    step, total_steps
        1-based step and the run's length.
    epoch
        0-based epoch the step belongs to.
    loss
        Mean contrastive loss over the step's global batches (``nan`` for a skipped step).
    lr
        Learning rate used.
    logit_scale
        The inverse temperature ``exp(logit_scale)`` used in this step (at most 100).
    samples_per_s
        Image-text pairs per second in this step (all processes together, data loading included).
    grad_norm
        Gradient norm before clipping (``None`` without clipping).
    skipped
        True when the step was skipped because its loss was not finite.
    elapsed_s
        Seconds since training started (this session).
    """

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    logit_scale: float
    samples_per_s: float
    grad_norm: float | None = None
    skipped: bool = False
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class EvalVectors:
    """The evaluation posts as the evaluated weights encode them: one L2-normalized row per post.

    Attributes
    ----------
    table
        The evaluated posts (``eval_posts`` less posts without an image), rows aligned with the vectors.
    image, text
        ``N x D`` float32 image and text vectors.
    image_ok
        ``N`` booleans: False where the image failed to decode (its vector is zeros and the post was not scored).
    """

    table: pl.DataFrame
    image: np.ndarray
    text: np.ndarray
    image_ok: np.ndarray


@dataclass(frozen=True)
class EvalInfo:
    """One evaluation on the held-out posts (passed to ``on_eval``).

    Attributes
    ----------
    step, epoch
        When it ran (step 0 = before training).
    metrics
        Flat ``"{direction}/{group}/{metric}"`` values (see :mod:`.metrics`).
    table
        The same as a polars table (direction x group rows).
    is_best
        True when the early-stopping metric improved.
    best_value
        Best value of the early-stopping metric so far (``None`` when none is watched).
    vectors
        The vectors that were scored (:class:`EvalVectors`), so listeners need not encode the posts again.
    """

    step: int
    epoch: int
    metrics: dict[str, float]
    table: pl.DataFrame
    is_best: bool = False
    best_value: float | None = None
    vectors: EvalVectors | None = None


@dataclass
class FineTuneResult:
    """Outcome of :func:`fine_tune`.

    Attributes
    ----------
    model
        The trained :class:`~ccclip_widgets.models.ClipModel` (the same object that was passed in).
    config
        The config used.
    steps, total_steps
        Optimizer steps done and planned.
    stopped
        ``"finished"``, ``"early_stopping"`` or ``"user"`` (``stop_event``).
    history
        One dict per step (``StepInfo`` fields).
    eval_history
        One dict per evaluation: ``step``, ``epoch`` and the flat metrics.
    final_metrics
        Metrics of the returned weights (the best evaluation when they were restored), or ``{}``.
    best_metric, best_step
        The early-stopping metric's best value and its step.
    output_dir, final_dir, best_dir, last_checkpoint
        Where things were written (``None`` without ``out_dir``).
    skipped
        Posts left out, with ``post_id``, ``reason``, ``detail`` (no image, image failed to decode).
    data_fingerprint
        Hash of the training posts.
    trainable_params
        Trainable parameter counts by tower.
    batch_size
        The global batch size used (it may have been shrunk to fit the data).
    elapsed_s, samples_per_s
        Training time in this session and mean throughput.
    """

    model: ClipModel
    config: FineTuneConfig
    steps: int
    total_steps: int
    stopped: str
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    output_dir: Path | None = None
    final_dir: Path | None = None
    best_dir: Path | None = None
    last_checkpoint: Path | None = None
    skipped: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=_SKIP_SCHEMA))
    data_fingerprint: str = ""
    trainable_params: dict[str, int] = field(default_factory=dict)
    batch_size: int = 0
    elapsed_s: float = 0.0
    samples_per_s: float = 0.0

    def metrics_table(self) -> pl.DataFrame:
        """``final_metrics`` as a table (direction x group rows, recall and rank columns)."""
        return metrics_frame(self.final_metrics)

    def summary(self) -> str:
        """A few human-readable lines: what ran, how it ended, where it was saved."""
        loss = next((h["loss"] for h in reversed(self.history) if not h.get("skipped")), float("nan"))
        lines = [
            f"fine-tuned {self.model.name}: {self.steps}/{self.total_steps} steps ({self.stopped}), "
            f"batch {self.batch_size}, final loss {loss:.4f}, {self.samples_per_s:.1f} pairs/s",
            f"trainable parameters: {self.trainable_params.get('total', 0):,}",
        ]
        if self.skipped.height:
            lines.append(f"posts skipped: {self.skipped.height} (see result.skipped)")
        if self.best_metric is not None:
            lines.append(
                f"best {self.config.early_stopping_metric} = {self.best_metric:.4f} at step {self.best_step}"
            )
        if self.final_dir is not None:
            lines.append(f"model: {self.final_dir}")
        elif self.last_checkpoint is not None:
            lines.append(f"checkpoint: {self.last_checkpoint}")
        return "\n".join(lines)


_SKIP_SCHEMA = {"post_id": pl.String, "reason": pl.String, "detail": pl.String}
