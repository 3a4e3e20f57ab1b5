"""The fine-tuning loop: :func:`fine_tune`.

One code path serves a notebook on a laptop CPU, one GPU, and ``torchrun`` on several GPUs (or CPU processes
with gloo). Each optimizer step: the next ``grad_accum_steps`` global batches (each rank decodes its slice),
forward under autocast, :class:`~.loss.ClipLoss` with features gathered across ranks, backward, clipping,
AdamW, the temperature clamped to at most 100. Then callbacks, evaluation, early stopping and checkpoints, in
that order, and a cooperative stop (``stop_event``) that saves a resumable checkpoint first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch
from torch import nn

from ..errors import TrainingDivergedError, TrainingWarning
from ..models import ClipModel
from . import checkpoint as ckpt
from .cached import tower_features
from .config import FineTuneConfig
from .data import PreparedPosts, default_train_workers, prepare_posts
from .distributed import DistInfo, barrier, broadcast_flag, init_distributed
from .evaluation import _resolve_precision, evaluate_in_memory
from .freeze import apply_trainable, freeze_locked_batchnorm
from .lora import LoraHandle, adapter_state, inject_lora, load_adapter, save_adapter
from .metrics import metrics_frame
from .results import (
    _SKIP_SCHEMA,
    EvalInfo,
    EvalVectors,
    FineTuneResult,
    StepInfo,
    TrainingOutOfMemoryError,
)
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

#: Config fields that must match to resume (they decide which tensors train and how they are initialized).
_STRUCTURAL = (
    "lock_image",
    "lock_text",
    "unlock_last_image_blocks",
    "unlock_last_text_blocks",
    "train_projections_only",
    "train_logit_scale",
    "lora",
)
#: Config fields that change the numbers of a resumed run (allowed, with a warning).
_EXACTNESS = (
    "seed",
    "batch_size",
    "lr",
    "weight_decay",
    "adam_betas",
    "adam_eps",
    "warmup_steps",
    "warmup_fraction",
    "schedule",
    "min_lr_ratio",
    "grad_accum_steps",
    "grad_clip",
    "precision",
    "augment",
    "mask_duplicates",
    "epochs",
    "max_steps",
)


# ================================================================================================= helpers


def _no_decay(name: str, param: torch.Tensor) -> bool:
    low = name.lower()
    return param.ndim < 2 or any(t in low for t in ("bias", "norm", "ln_", "bn", "logit_scale", "embedding"))


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


class _Trainer(_Stepping):
    """State of one fine-tuning run (kept out of the public API)."""

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

    # ------------------------------------------------------------------------------------------- set-up
    def _setup_distributed(self) -> DistInfo:
        info = init_distributed(self.clip.device.type)
        if info.enabled and self.clip.device.type == "cuda":
            want = torch.device("cuda", info.local_rank)
            if self.clip.device != want:
                self.clip.to(want)
        return info

    def _batch_size(self, n: int, world: int) -> int:
        b = self.config.batch_size
        if b % world:
            raise ValueError(f"batch_size {b} must be a multiple of the number of processes ({world})")
        if n < 2:
            raise ValueError(
                f"Fine-tuning needs at least 2 usable training posts (pairs are contrasted with each other); got {n}"
                + (f" ({len(self.failures)} skipped: see the warnings)" if self.failures else "")
                + "."
            )
        if b > n:
            shrunk = (n // world) * world
            if shrunk < 2 or shrunk // world < 1:
                raise ValueError(
                    f"The {n} usable training posts cannot be split into a batch of at least 2 pairs over {world} "
                    "processes; add posts or use fewer processes."
                )
            warnings.warn(
                f"batch_size={b} is larger than the {n} usable training posts; using batch_size={shrunk} "
                "(every epoch is one batch). Set batch_size <= the number of posts to silence this.",
                TrainingWarning,
                stacklevel=4,
            )
            return shrunk
        return b

    def _make_trainable(self) -> dict[str, int]:
        model = self.clip.model
        if self.config.lora is not None:
            torch.manual_seed(self.config.seed)
            self.lora = inject_lora(model, self.config.lora)
            if "logit_scale" in dict(model.named_parameters()):
                model.logit_scale.requires_grad_(self.config.train_logit_scale)
            counts = {"image": 0, "text": 0, "other": 0}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    tower = (
                        "image"
                        if name.startswith("visual.")
                        else "other"
                        if name == "logit_scale"
                        else "text"
                    )
                    counts[tower] += p.numel()
            counts["total"] = sum(counts.values())
        else:
            counts = apply_trainable(model, self.config)
        if counts["total"] == 0:
            raise ValueError("Nothing to train: the config freezes every parameter")
        logit_bias = getattr(model, "logit_bias", None)
        if isinstance(logit_bias, nn.Parameter):
            logit_bias.requires_grad_(False)  # unused by InfoNCE (a constant shift of all logits)
        return counts

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.clip.model.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs: dict[str, Any] = {
            "lr": lr,
            "betas": tuple(self.config.adam_betas),
            "eps": self.config.adam_eps,
        }
        if self.clip.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)

    def _total_steps(self, n: int) -> int:
        cfg = self.config
        steps_per_epoch = math.ceil((n // self.batch) / cfg.grad_accum_steps)
        return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch

    def _restore_schedule(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Put the learning-rate schedule where the checkpoint left it (after the optimizer's own state)."""
        scheduler = self.scheduler
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint written before the schedule was saved: its position is the step count
            scheduler.last_epoch = int(state["step"])
        # the schedule follows the config of this run (a changed lr or schedule was warned about)
        peak = self.config.resolved_lr
        scheduler.base_lrs = [peak] * len(optimizer.param_groups)
        lr = peak * self.config.lr_factor(scheduler.last_epoch, self.total)
        for g in optimizer.param_groups:
            g["initial_lr"], g["lr"] = peak, lr
        scheduler._last_lr = [lr] * len(optimizer.param_groups)  # type: ignore[attr-defined]

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        model = self.clip.model
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        names |= {n for n, _ in model.named_buffers()}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        target = self.clip.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                target[k].copy_(v.to(target[k].dtype))

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

    def _check_resume(self, state: dict[str, Any], train: PreparedPosts, base: dict[str, Any]) -> None:
        saved = state.get("config", {})
        now = self.config.to_dict()
        if state.get("data_fingerprint") != train.fingerprint:
            raise ValueError(
                "resume_from: the checkpoint was trained on other posts (data fingerprint "
                f"{state.get('data_fingerprint')} != {train.fingerprint}). Resume with the same training posts in "
                "the same order, or start a new run."
            )
        structural = [k for k in _STRUCTURAL if saved.get(k) != now.get(k)]
        if structural:
            raise ValueError(
                f"resume_from: the checkpoint was trained with other settings for {structural} "
                f"(checkpoint: {[saved.get(k) for k in structural]}, now: {[now.get(k) for k in structural]}); "
                "these decide which weights train, so the run cannot continue with different values."
            )
        changed = [k for k in _EXACTNESS if saved.get(k) != now.get(k)]
        if changed:
            warnings.warn(
                f"Resuming with changed settings {changed}; the run continues but will not match an "
                "uninterrupted one.",
                TrainingWarning,
                stacklevel=5,
            )
        saved_base = state.get("base", {})
        if self.config.lora is not None and saved_base.get("fingerprint") not in (None, base["fingerprint"]):
            raise ValueError(
                "resume_from: LoRA adapters must continue on the same base weights, but the model given "
                f"({base['spec']}, fingerprint {base['fingerprint']}) differs from the run's base "
                f"({saved_base.get('spec')}, fingerprint {saved_base.get('fingerprint')})."
            )

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

    def _restore_state(self, state: dict[str, Any] | None) -> _Position:
        """Where the run starts: step 0 (seeded), or the saved position, history, best and RNG states."""
        pos = _Position()
        if state is None:
            torch.manual_seed(self.config.seed)
            return pos
        pos.step, pos.epoch, pos.batch_in_epoch = (
            int(state["step"]),
            int(state["epoch"]),
            int(state["batch_in_epoch"]),
        )
        self.history = list(state.get("history", []))
        self.eval_history = list(state.get("eval_history", []))
        best = state.get("best", {})
        self.best_value = best.get("value")
        self.best_step = best.get("step")
        self.bad_evals = int(best.get("bad_evals", 0))
        self.best_metrics = dict(best.get("metrics", {}))
        self.nan_count = int(state.get("nan_count", 0))
        for pid, reason in state.get("failures", []):
            self.failures.setdefault(pid, reason)
        pos.elapsed_before = float(state.get("elapsed_s", 0.0))
        pos.samples_before = int(state.get("samples_seen", 0))
        if self.out is not None and (self.out / "best").is_dir():
            self.best_dir = self.out / "best"
        ckpt.restore_rng(state["rng"])
        return pos

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

    # ------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, data: PreparedPosts, step: int, epoch: int) -> bool:
        """Evaluate on rank 0; returns True when early stopping says stop (only meaningful on rank 0)."""
        if not self.dist.is_main:
            return False
        cfg = self.config
        workers = (
            cfg.num_workers
            if cfg.num_workers is not None
            else default_train_workers(self.clip.device, len(data))
        )
        features = None
        if getattr(self, "cached", False):
            if getattr(self, "eval_features", None) is None:
                self.eval_features = tower_features(
                    self.clip,
                    data,
                    batch_size=cfg.eval_batch_size,
                    num_workers=workers,
                    precision=self.precision,
                    show_progress=cfg.show_progress,
                )
            features = self.eval_features
        scored: list[EvalVectors] = []
        metrics, n_failed = evaluate_in_memory(
            self.clip,
            data,
            batch_size=cfg.eval_batch_size,
            num_workers=workers,
            precision=self.precision,
            features=features,
            vectors_out=scored if self.on_eval is not None else None,
        )
        if n_failed:
            metrics["n_eval_images_failed"] = float(n_failed)
        is_best = False
        stop = False
        name = cfg.early_stopping_metric
        if name is not None:
            if name not in metrics:
                known = sorted(k for k in metrics if k.startswith(name.split("/")[0]))
                raise ValueError(
                    f"early_stopping_metric {name!r} is not among the evaluation metrics; available: {known[:40]}"
                )
            value = metrics[name]
            better = self.best_value is None or (
                value > self.best_value if cfg.early_stopping_direction == "max" else value < self.best_value
            )
            if better and math.isfinite(value):
                self.best_value, self.best_step, self.bad_evals = value, step, 0
                self.best_metrics = dict(metrics)
                is_best = True
                self.best_state = self._trainable_state()
                if self.out is not None:
                    self._write_best(step, metrics)
            elif step > 0:
                self.bad_evals += 1
                stop = self.bad_evals >= cfg.early_stopping_patience
        self.eval_history.append({"step": step, "epoch": epoch, **metrics})
        if self.on_eval is not None:
            self.on_eval(
                EvalInfo(
                    step,
                    epoch,
                    metrics,
                    metrics_frame(metrics),
                    is_best=is_best,
                    best_value=self.best_value,
                    vectors=scored[0] if scored else None,
                )
            )
        return stop

    # ------------------------------------------------------------------------------------------- saving
    # The files themselves are :mod:`.checkpoint`'s business; these gather the trainer's state for it.
    def _training_meta(
        self, step: int, epoch: int, metrics: dict[str, float] | None = None
    ) -> dict[str, Any]:
        return ckpt.training_meta(
            config=self.config,
            step=step,
            total_steps=self.total,
            epoch=epoch,
            batch_size=self.batch,
            metrics=metrics if metrics is not None else (self.eval_history[-1] if self.eval_history else {}),
            data_fingerprint=self.train.fingerprint,
            n_train_posts=len(self.train),
            base=self.base,
            device=self.clip.device,
            world_size=self.dist.world_size,
        )

    def _model_writer(self, meta: dict[str, Any], adapter: dict[str, torch.Tensor] | None = None) -> Callable:
        return ckpt.model_writer(self.clip, self.lora, self.base, meta, adapter)

    def _checkpoint(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        step: int,
        epoch: int,
        batch_in_epoch: int,
        samples_seen: int,
    ) -> None:
        if self.dist.is_main and self.out is not None:
            state = ckpt.trainer_state(
                optimizer=optimizer,
                scheduler=self.scheduler,
                scaler=scaler,
                step=step,
                epoch=epoch,
                batch_in_epoch=batch_in_epoch,
                config=self.config,
                data_fingerprint=self.train.fingerprint,
                base=self.base,
                history=self.history,
                eval_history=self.eval_history,
                best={
                    "metric": self.config.early_stopping_metric,
                    "value": self.best_value,
                    "step": self.best_step,
                    "bad_evals": self.bad_evals,
                    "metrics": self.best_metrics,
                },
                nan_count=self.nan_count,
                failures=self.failures,
                batch_size=self.batch,
                world_size=self.dist.world_size,
                samples_seen=samples_seen,
            )
            writer = self._model_writer(self._training_meta(step, epoch))
            folder = ckpt.write_checkpoint(self.out, step, writer, state, self.config.keep_checkpoints)
            self.last_checkpoint = folder
            self._write_run_file("running", step, folder)
        barrier()

    def _write_best(self, step: int, metrics: dict[str, float]) -> None:
        assert self.out is not None
        meta = self._training_meta(step, -1, metrics)
        meta["training"]["best"] = {"metric": self.config.early_stopping_metric, "value": self.best_value}
        self.best_dir = ckpt.write_folder(self.out / "best", self._model_writer(meta))

    def _write_run_file(self, status: str, step: int, latest: Path | None, final: Path | None = None) -> None:
        assert self.out is not None
        best = None
        if self.best_value is not None:
            best = {
                "metric": self.config.early_stopping_metric,
                "value": self.best_value,
                "step": self.best_step,
            }
        info = ckpt.run_info(
            status=status,
            step=step,
            total_steps=getattr(self, "total", None),
            latest=latest,
            best=best,
            final=final,
            data_fingerprint=self.train.fingerprint,
            config=self.config,
        )
        ckpt.write_run_file(self.out, info)

    # ------------------------------------------------------------------------------------------- the end
    def _finish(
        self,
        stopped: str,
        step: int,
        epoch: int,
        samples: int,
        elapsed: float,
        elapsed_before: float,
        eval_data: PreparedPosts | None,
        counts: dict[str, int],
    ) -> FineTuneResult:
        cfg = self.config
        clip = self.clip
        final_metrics = dict(self.eval_history[-1]) if self.eval_history else {}
        restored = False
        if stopped != "user" and cfg.restore_best and self.best_step is not None and self.best_step != step:
            if self.best_state is not None:
                self._load_state(self.best_state)
                restored = True
            elif self.best_dir is not None:  # resumed run: the best weights are on disk
                if self.lora is not None:
                    load_adapter(self.best_dir, clip.model, self.lora)
                else:
                    ckpt.load_full_weights(self.best_dir, clip.model)
                restored = True
            if restored:
                final_metrics = dict(self.best_metrics)
        final_metrics = {k: v for k, v in final_metrics.items() if k not in ("step", "epoch")}

        final_dir = None
        merged = False
        adapter = adapter_state(clip.model, self.lora) if self.lora is not None else None
        if self.lora is not None and stopped != "user" and self.lora.settings.merge_at_end:
            self.lora.merge()
            merged = True
        if self.dist.is_main and self.out is not None and stopped != "user":
            final_dir = self.out / "final"
            meta = self._training_meta(step, epoch, final_metrics)
            meta["training"]["stopped"] = stopped
            meta["training"]["restored_best_from_step"] = self.best_step if restored else None
            if self.lora is not None and not merged:
                ckpt.write_folder(final_dir, self._model_writer(meta, adapter))
            else:
                lora = self.lora

                def write_final(tmp: Path) -> None:
                    clip.invalidate_fingerprint()
                    ckpt.save_model_into(tmp, clip, provenance=ckpt.provenance(clip, self.base), extra=meta)
                    if lora is not None and adapter is not None:
                        (tmp / "adapter").mkdir()
                        save_adapter(tmp / "adapter", adapter, lora, base=self.base, extra=meta)

                ckpt.write_folder(final_dir, write_final)
            self._write_run_file(stopped, step, self.last_checkpoint, final_dir)
        elif self.dist.is_main and self.out is not None:
            self._write_run_file("stopped", step, self.last_checkpoint)
        barrier()
        if merged:
            self.lora = None

        skipped = self._gather_failures()
        if skipped.height and self.dist.is_main:
            reasons = skipped.group_by("reason").len().sort("len", descending=True)
            listing = ", ".join(f"{r}: {k}" for r, k in zip(reasons["reason"], reasons["len"], strict=True))
            warnings.warn(
                f"{skipped.height} training post(s) were skipped ({listing}); see result.skipped",
                TrainingWarning,
                stacklevel=4,
            )
        total_time = elapsed_before + elapsed
        return FineTuneResult(
            model=clip,
            config=cfg,
            steps=step,
            total_steps=self.total,
            stopped=stopped,
            history=self.history,
            eval_history=self.eval_history,
            final_metrics=final_metrics,
            best_metric=self.best_value,
            best_step=self.best_step,
            output_dir=self.out,
            final_dir=final_dir,
            best_dir=self.best_dir,
            last_checkpoint=self.last_checkpoint,
            skipped=skipped,
            data_fingerprint=self.train.fingerprint,
            trainable_params=counts,
            batch_size=self.batch,
            elapsed_s=total_time,
            samples_per_s=samples / elapsed if elapsed > 0 else float("nan"),
        )

    def _gather_failures(self) -> pl.DataFrame:
        items = list(self.failures.items())
        if self.dist.enabled:
            import torch.distributed as tdist

            gathered: list[Any] = [None] * self.dist.world_size
            tdist.all_gather_object(gathered, items)
            merged: dict[str, str] = {}
            for part in gathered:
                for k, v in part or []:
                    merged.setdefault(k, v)
            items = list(merged.items())
        if not items:
            return pl.DataFrame(schema=_SKIP_SCHEMA)
        reasons = [v.split(":", 1) for _, v in items]
        return pl.DataFrame(
            {
                "post_id": [k for k, _ in items],
                "reason": [r[0].strip() for r in reasons],
                "detail": [r[1].strip() if len(r) > 1 else "" for r in reasons],
            },
            schema=_SKIP_SCHEMA,
        )
