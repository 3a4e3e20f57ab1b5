"""The fine-tuning loop: :func:`fine_tune`.

One code path serves a notebook on a laptop CPU, one GPU, and ``torchrun`` on several GPUs (or CPU processes
with gloo). Each optimizer step: the next ``grad_accum_steps`` global batches (each rank decodes its slice),
forward under autocast, :class:`~.loss.ClipLoss` with features gathered across ranks, backward, clipping,
AdamW, the temperature clamped to at most 100. Then callbacks, evaluation, early stopping and checkpoints, in
that order, and a cooperative stop (``stop_event``) that saves a resumable checkpoint first.

This module holds the run itself: its order of set-up, the loop and the decisions after each step. The
trainer's other jobs live in their own modules, as mixins of :class:`_Trainer`: setting a run up and reading a
checkpoint back (:mod:`.run_setup`), feeding and taking one step (:mod:`.step`), evaluation and early stopping
(:mod:`.evaluation`), and what a run writes and how it ends (:mod:`.saving`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingDivergedError, TrainingWarning
from ..models import ClipModel
from . import checkpoint as ckpt
from .config import FineTuneConfig
from .data import PreparedPosts, prepare_posts
from .distributed import broadcast_flag
from .evaluation import _Evaluating, _resolve_precision, evaluate_in_memory
from .freeze import freeze_locked_batchnorm
from .lora import LoraHandle, load_adapter
from .results import EvalInfo, EvalVectors, FineTuneResult, StepInfo, TrainingOutOfMemoryError
from .run_setup import _RunSetup
from .saving import _Saving
from .step import _LoopParts, _Position, _Stepping

log = logging.getLogger(__name__)

__all__ = [
    "EvalInfo",
    "EvalVectors",
    "FineTuneResult",
    "StepInfo",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "evaluate_in_memory",
    "fine_tune",
]


# ================================================================================================= helpers
def _oom_error(
    exc: BaseException, config: FineTuneConfig, batch_size: int, world: int
) -> TrainingOutOfMemoryError:
    hints = [f"a smaller batch_size (now {batch_size}; e.g. {max(2, batch_size // 2)})"]
    if not config.grad_checkpointing:
        hints.append("grad_checkpointing=True (recompute activations)")
    hints.append(
        f"grad_accum_steps={config.grad_accum_steps * 2} with a halved batch (same pairs per step; note that "
        "negatives are shared only within each batch)"
    )
    if config.lora is None:
        hints.append("LoRA adapters or lock_image/lock_text (fewer gradients and optimizer states)")
    per_rank = batch_size // max(1, world)
    return TrainingOutOfMemoryError(
        f"Out of GPU memory while training with {per_rank} pairs per GPU. Try "
        + "; ".join(hints)
        + f". ({exc})"
    )


# ================================================================================================= fine_tune
def fine_tune(
    model: ClipModel,
    train_posts: Any,
    config: FineTuneConfig | None = None,
    eval_posts: Any | None = None,
    on_step: Callable[[StepInfo], Any] | None = None,
    on_eval: Callable[[EvalInfo], Any] | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    stop_event: threading.Event | None = None,
) -> FineTuneResult:
    """Fine-tune a CLIP model contrastively on the image-text pairs of a posts table (C-CLIP).

    The model is trained in place (symmetric InfoNCE with a learnable temperature, AdamW, warm-up + cosine
    schedule) and returned in the result. Under ``torchrun`` the same call trains with DistributedDataParallel,
    negatives spanning the global batch; only rank 0 writes files and calls the callbacks.

    Parameters
    ----------
    model
        The :class:`~ccclip_widgets.models.ClipModel` to train (from :func:`~ccclip_widgets.models.load_model`).
    train_posts
        A :class:`~ccclip_widgets.posts.Posts` (every row is a training pair).
    config
        A :class:`FineTuneConfig` (default: ``FineTuneConfig()``).
    eval_posts
        Held-out posts scored during training (recall@1/5/10 and median rank, both directions, per caption kind
        and language) and used for early stopping.
    on_step
        Called with a :class:`StepInfo` after every optimizer step (for live plots); it may set ``stop_event``.
    on_eval
        Called with an :class:`EvalInfo` after every evaluation.
    resume_from
        A ``checkpoint-N`` folder, or an output folder (its newest checkpoint): training continues exactly where
        it stopped (weights, optimizer, schedule, RNG, data position). The model passed in must have the same
        architecture (and, for LoRA, the same base weights).
    out_dir
        Folder for checkpoints, ``best/``, ``final/`` and ``run.json`` (default: the folder holding
        ``resume_from``; ``None`` without it: nothing is written).
    stop_event
        Set it (e.g. from a widget's Stop button) to end training after the current step; a resumable checkpoint
        is written first when ``out_dir`` is set.

    Returns
    -------
    FineTuneResult

    Raises
    ------
    ValueError
        Fewer than 2 usable posts, an empty text, an impossible config, or a checkpoint that does not fit.
    TrainingDivergedError
        The loss became NaN/inf more often than ``max_nan_tolerance`` allows (names the step and the last good
        checkpoint).
    TrainingOutOfMemoryError
        CUDA ran out of memory (the message suggests a smaller batch, gradient checkpointing, accumulation).

    Notes
    -----
    If the training set has fewer usable posts than ``batch_size``, the batch is shrunk to the data size (rounded
    down to a multiple of the number of processes) with a warning. Images that fail to decode are skipped and
    listed in ``result.skipped``. With LoRA and ``merge_at_end`` the adapters are merged at the end, so the
    returned model is a plain open_clip model; if training fails, the adapters are removed again and the model is
    as it was.
    """
    config = config or FineTuneConfig()
    if not isinstance(config, FineTuneConfig):
        raise TypeError(f"config must be a FineTuneConfig, got {type(config).__name__}")
    if not isinstance(model, ClipModel):
        raise TypeError(f"model must be a ClipModel (from load_model), got {type(model).__name__}")
    trainer = _Trainer(model, config, on_step, on_eval, stop_event)
    return trainer.run(train_posts, eval_posts, resume_from, out_dir)


class _Trainer(_RunSetup, _Stepping, _Evaluating, _Saving):
    """State of one fine-tuning run (kept out of the public API); its mixins' methods work on this state."""

    def __init__(
        self,
        clip: ClipModel,
        config: FineTuneConfig,
        on_step: Callable[[StepInfo], Any] | None,
        on_eval: Callable[[EvalInfo], Any] | None,
        stop_event: threading.Event | None,
    ) -> None:
        self.clip = clip
        self.config = config
        self.on_step = on_step
        self.on_eval = on_eval
        self.stop_event = stop_event
        self.lora: LoraHandle | None = None
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] = {}
        self.bad_evals = 0
        self.nan_count = 0
        self.failures: dict[str, str] = {}
        self.last_checkpoint: Path | None = None
        self.best_dir: Path | None = None
        self.out: Path | None = None

    # ------------------------------------------------------------------------------------------- run
    def run(
        self,
        train_posts: Any,
        eval_posts: Any | None,
        resume_from: str | os.PathLike[str] | None,
        out_dir: str | os.PathLike[str] | None,
    ) -> FineTuneResult:
        with contextlib.ExitStack() as stack:
            self._exit_stack = stack
            return self._run(train_posts, eval_posts, resume_from, out_dir)

    def _run(
        self,
        train_posts: Any,
        eval_posts: Any | None,
        resume_from: str | os.PathLike[str] | None,
        out_dir: str | os.PathLike[str] | None,
    ) -> FineTuneResult:
        cfg = self.config
        clip = self.clip
        dist = self._setup_distributed()
        self.dist = dist
        device = clip.device
        precision = _resolve_precision(cfg.precision, device)
        self.precision = precision

        train = prepare_posts(train_posts, clip, role="training")
        for s in train.skipped:
            self.failures[s["post_id"]] = f"{s['reason']}: {s['detail']}"
        if train.n_truncated and dist.is_main:
            log.info(
                "%d training texts are longer than the model's context and are truncated", train.n_truncated
            )
        batch = self._batch_size(len(train), dist.world_size)
        eval_data = prepare_posts(eval_posts, clip, role="evaluation") if eval_posts is not None else None
        if eval_data is not None and len(eval_data) == 0:
            warnings.warn(
                "eval_posts holds no usable post; training runs without evaluation",
                TrainingWarning,
                stacklevel=3,
            )
            eval_data = None
        if eval_data is None and cfg.early_stopping_metric is not None:
            warnings.warn(
                f"early_stopping_metric={cfg.early_stopping_metric!r} needs eval_posts; early stopping is off",
                TrainingWarning,
                stacklevel=3,
            )

        resume_dir = None
        if resume_from is not None and not Path(resume_from).exists():
            raise FileNotFoundError(
                f"No resumable checkpoint (checkpoint-N/{ckpt.TRAINER_STATE}) in {resume_from}: it does not exist"
            )
        if resume_from is not None and out_dir is None:
            given = Path(resume_from)
            named = (given / ckpt.TRAINER_STATE).is_file() or ckpt._CKPT_RE.match(given.name) is not None
            out_dir = given.parent if named else given
        self.out = Path(out_dir) if out_dir is not None else None
        if self.out is not None and dist.is_main:
            # One trainer per run folder; holding the lock, leftovers of a killed run are tidied away.
            self._exit_stack.enter_context(ckpt.run_lock(self.out))
        if resume_from is not None:
            own = self.out is not None and Path(resume_from).resolve() == self.out.resolve()
            resume_dir = ckpt.resolve_resume(resume_from, set_aside=dist.is_main and own)
            if resume_dir is None:
                raise FileNotFoundError(
                    f"No resumable checkpoint (checkpoint-N/{ckpt.TRAINER_STATE}) in {resume_from}"
                )

        base = {"spec": clip.spec, "name": clip.name, "fingerprint": clip.fingerprint}
        state = ckpt.load_trainer_state(resume_dir) if resume_dir is not None else None
        if state is not None:
            self._check_resume(state, train, base)
            base = dict(state.get("base", base))

        saved_flags = {n: p.requires_grad for n, p in clip.model.named_parameters()}
        saved_gc = cfg.grad_checkpointing
        self.base = base
        self.train = train
        self.batch = batch
        try:
            counts = self._make_trainable()
            if cfg.grad_checkpointing:
                clip.model.set_grad_checkpointing(True)
            channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
            if channels_last:
                clip.model.to(memory_format=torch.channels_last)
            self.channels_last = channels_last
            if state is not None:
                if self.lora is not None:
                    load_adapter(resume_dir, clip.model, self.lora)  # type: ignore[arg-type]
                else:
                    ckpt.load_full_weights(resume_dir, clip.model)  # type: ignore[arg-type]
            self.total = self._total_steps(len(train))
            optimizer = self._optimizer(cfg.resolved_lr)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: cfg.lr_factor(step, self.total)
            )
            scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
            if state is not None:
                optimizer.load_state_dict(state["optimizer"])
                self._restore_schedule(optimizer, state)
                if state.get("scaler"):
                    scaler.load_state_dict(state["scaler"])
            result = self._loop(train, eval_data, optimizer, scaler, state, counts)
        except BaseException as exc:
            if self.lora is not None:  # give the model back as it came: without the half-trained adapters
                with contextlib.suppress(Exception):
                    self.lora.unload()
                self.lora = None
            if isinstance(exc, torch.cuda.OutOfMemoryError) and not isinstance(exc, TrainingOutOfMemoryError):
                raise _oom_error(exc, cfg, batch, dist.world_size) from exc
            raise
        finally:
            model = clip.model
            if saved_gc:
                with contextlib.suppress(Exception):
                    model.set_grad_checkpointing(False)
            for n, p in model.named_parameters():
                p.requires_grad_(saved_flags.get(n, True))
            model.eval()
            clip.invalidate_fingerprint()
        return result

    # ------------------------------------------------------------------------------------------- the loop
    def _loop(
        self,
        train: PreparedPosts,
        eval_data: PreparedPosts | None,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        state: dict[str, Any] | None,
        counts: dict[str, int],
    ) -> FineTuneResult:
        parts = self._build_parts(train, optimizer, scaler)
        pos = self._restore_state(state)
        self.clip.model.train()
        freeze_locked_batchnorm(self.clip.model)
        pos.t_start = time.perf_counter()
        parts.pbar = self._progress_bar(parts, pos)
        batches = None
        try:
            if (
                eval_data is not None
                and self.config.eval_at_start
                and pos.step == 0
                and not self.eval_history
            ):
                self._evaluate(eval_data, pos.step, pos.epoch)
            batches = self._make_batches(train, parts, pos)
            while pos.step < self.total and pos.stopped == "finished":
                if pos.batch_in_epoch >= parts.n_batches:
                    pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                while pos.batch_in_epoch < parts.n_batches and pos.step < self.total:
                    self._train_step(train, parts, pos, batches, optimizer, scaler)
                    if self._after_step(parts, pos, eval_data, optimizer, scaler):
                        break
        finally:
            parts.pbar.close()
            with contextlib.suppress(Exception):
                del batches  # stops the worker processes now rather than at garbage collection
        elapsed = time.perf_counter() - pos.t_start
        return self._finish(
            pos.stopped, pos.step, pos.epoch, pos.samples, elapsed, pos.elapsed_before, eval_data, counts
        )

    def _after_step(
        self,
        parts: _LoopParts,
        pos: _Position,
        eval_data: PreparedPosts | None,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> bool:
        """Logging, evaluation, checkpoint and the stop decision after a step; True when the run stops."""
        cfg = self.config
        device = self.clip.device
        step, total = pos.step, self.total
        epoch_end = pos.batch_in_epoch >= parts.n_batches
        every = cfg.eval_every_steps
        want_eval = eval_data is not None and (
            (every > 0 and step % every == 0) or (every == 0 and epoch_end) or step == total
        )
        periodic = cfg.checkpoint_every_steps > 0 and step % cfg.checkpoint_every_steps == 0
        stop_asked = self.stop_event is not None and self.stop_event.is_set()
        if (
            step % parts.read_every == 0
            or step == total
            or want_eval
            or (periodic and self.out is not None)
            or stop_asked
        ):
            self._settle(parts, pos)
        user_stop = self.stop_event is not None and self.stop_event.is_set()
        user_stop = broadcast_flag(user_stop, device)
        if user_stop and pos.pending:
            self._settle(parts, pos)
        early = False
        if want_eval:
            early = self._evaluate(eval_data, step, pos.epoch)  # type: ignore[arg-type]
        early = broadcast_flag(early, device)

        if self.out is not None and (periodic or user_stop or early or step == total):
            self._checkpoint(
                optimizer, scaler, step, pos.epoch, pos.batch_in_epoch, pos.samples_before + pos.samples
            )
        if user_stop:
            pos.stopped = "user"
        elif early:
            pos.stopped = "early_stopping"
        return pos.stopped != "finished"
