"""The FineTune panel's settings: what the controls show, and the training config they make (widget-free)."""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..train import FineTuneConfig

__all__ = ["SETTINGS", "TRAINS", "FineTuneSettings"]

#: Choices of the "what trains" menu: key -> label.
TRAINS: dict[str, str] = {
    "full": "everything (full fine-tune)",
    "lock_image": "lock the image tower",
    "lock_text": "lock the text tower",
    "heads": "lock both towers (what trains outside them, e.g. the temperature)",
    "projections": "projections only",
    "lora": "LoRA adapters",
}
#: The settings a panel shows, in order.
SETTINGS: tuple[str, ...] = (
    "epochs",
    "max_steps",
    "batch_size",
    "lr",
    "trains",
    "unlock_blocks",
    "eval_every_steps",
)


class FineTuneSettings:
    """Settings over a base :class:`~ccclip_widgets.train.FineTuneConfig`; :attr:`config` applies them.

    Parameters
    ----------
    base
        The starting config: its values fill the settings, and it supplies every other field.
    """

    def __init__(self, base: FineTuneConfig) -> None:
        self.base = base
        self._lock = threading.RLock()
        self._values = _settings_from_config(base)
        self._lr_touched = base.lr is not None

    def update(self, **settings: Any) -> None:
        """Change settings (see :meth:`FineTune.configure`); unknown names and bad ``trains`` raise."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {list(SETTINGS)}")
        if "trains" in settings and settings["trains"] not in TRAINS:
            raise ValueError(f"trains must be one of {list(TRAINS)}, got {settings['trains']!r}")
        with self._lock:
            if "lr" in settings:
                self._lr_touched = settings["lr"] is not None
            self._values.update(settings)
            if settings.get("max_steps") == 0:
                self._values["max_steps"] = None

    @property
    def values(self) -> dict[str, Any]:
        """A copy of the current settings."""
        with self._lock:
            return dict(self._values)

    @property
    def config(self) -> FineTuneConfig:
        """The base config with the settings applied (validated by the config; may raise ``ValueError``)."""
        from ..train import LoraSettings

        s = self.values
        base = self.base
        trains = s["trains"]
        unlock = int(s["unlock_blocks"] or 0)
        changes: dict[str, Any] = {
            "epochs": int(s["epochs"]),
            "max_steps": int(s["max_steps"]) if s["max_steps"] else None,
            "batch_size": int(s["batch_size"]),
            "lr": float(s["lr"]) if (s["lr"] is not None and self._lr_touched) else base.lr,
            "eval_every_steps": int(s["eval_every_steps"] or 0),
            "lock_image": trains in ("lock_image", "heads"),
            "lock_text": trains in ("lock_text", "heads"),
            "unlock_last_image_blocks": unlock if trains == "lock_image" else 0,
            "unlock_last_text_blocks": unlock if trains == "lock_text" else 0,
            "train_projections_only": trains == "projections",
            "lora": (base.lora or LoraSettings()) if trains == "lora" else None,
        }
        return dataclasses.replace(base, **changes)

    @property
    def shown_lr(self) -> float:
        """The learning rate a run would use (the engine's default for what trains unless set)."""
        with self._lock:
            if self._lr_touched and self._values["lr"] is not None:
                return float(self._values["lr"])
        try:
            return self.config.resolved_lr
        except (ValueError, TypeError):
            return self.base.resolved_lr


def estimate_total(cfg: FineTuneConfig, n: int) -> int:
    """Steps the engine will plan for ``n`` training posts (it reports the exact number with the first step)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    batch = max(2, min(cfg.batch_size, n))
    return cfg.epochs * max(1, math.ceil((n // batch) / cfg.grad_accum_steps))


def preparing_phase(cfg: FineTuneConfig, n: int) -> str:
    """What a run does before its first step, in words (the fast path encodes each image and text once)."""
    fast = (
        not cfg.augment
        and cfg.lora is None
        and (
            cfg.train_projections_only
            or (
                cfg.lock_image
                and cfg.lock_text
                and not cfg.unlock_last_image_blocks
                and not cfg.unlock_last_text_blocks
            )
        )
    )
    if fast:
        return f"preparing {n:,} training posts: both towers are locked, encoding each image and text once"
    return f"preparing {n:,} training posts (tokenizing, first batches)"


def _settings_from_config(cfg: FineTuneConfig) -> dict[str, Any]:
    if cfg.lora is not None:
        trains, unlock = "lora", 0
    elif cfg.train_projections_only:
        trains, unlock = "projections", 0
    elif cfg.lock_image and cfg.lock_text:
        trains, unlock = "heads", 0
    elif cfg.lock_image:
        trains, unlock = "lock_image", cfg.unlock_last_image_blocks
    elif cfg.lock_text:
        trains, unlock = "lock_text", cfg.unlock_last_text_blocks
    else:
        trains, unlock = "full", 0
    return {
        "epochs": cfg.epochs,
        "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "trains": trains,
        "unlock_blocks": unlock,
        "eval_every_steps": cfg.eval_every_steps,
    }
