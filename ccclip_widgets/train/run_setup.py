"""Setting a fine-tuning run up, before its first step.

The distributed set-up, the batch size, which parameters train (tower locking or LoRA), AdamW with its weight
decay groups, the run's length, and, for a resumed run, the checks that the checkpoint fits this config and the
restored schedule, counters, history and RNG states; also snapshots of the trainable weights (for ``best``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import TrainingWarning
from . import checkpoint as ckpt
from .data import PreparedPosts
from .distributed import DistInfo, init_distributed
from .freeze import apply_trainable
from .lora import inject_lora
from .step import _Position

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


def _no_decay(name: str, param: torch.Tensor) -> bool:
    low = name.lower()
    return param.ndim < 2 or any(t in low for t in ("bias", "norm", "ln_", "bn", "logit_scale", "embedding"))


class _RunSetup:
    """How :class:`~.loop._Trainer` sets a run up (a mixin: it works on the trainer's state)."""

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
