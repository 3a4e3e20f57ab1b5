"""Fine-tuning configuration: a frozen, validated dataclass that round-trips through JSON and the CLI.

Every field has a default that works for a small CPU run and scales to a GPU run; the CLI flags
(``ccclip finetune --lr 1e-5 --lock-image ...``) are generated from the fields, so the two never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "FineTuneConfig",
    "LoraSettings",
    "add_config_arguments",
    "config_from_args",
]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")
LORA_TOWERS: tuple[str, ...] = ("both", "image", "text")
#: Lower-is-better metric names; every other metric (recall) is higher-is-better.
_MIN_METRICS: tuple[str, ...] = ("median_rank", "mean_rank", "loss")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (LoRA, via peft) instead of updating the model's own weights.

    Attributes
    ----------
    r
        Rank of each adapter.
    alpha
        Scaling numerator (the update is scaled by ``alpha / r``).
    dropout
        Dropout on the adapter input.
    target_modules
        Module-name suffixes to adapt (e.g. ``("c_fc", "c_proj")``); ``None`` picks them per architecture:
        every Linear layer inside the transformer/ResNet blocks (MLPs, attention projections; HF
        ``query``/``key``/``value``/``dense``) and, for ``torch.nn.MultiheadAttention``, its fused q/k/v
        weight ``in_proj_weight``.
    towers
        ``"both"``, ``"image"`` or ``"text"``: which towers get adapters.
    merge_at_end
        Merge the adapters into the weights when training ends, so the returned model and ``final/`` are a
        plain open_clip model (``load_model`` and ``open_clip`` load it). Checkpoints always hold the adapters.
    """

    r: int = field(default=8, metadata=_help("LoRA rank"))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha (update scaled by alpha / r)"))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout"))
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata=_help("module-name suffixes to adapt (default: chosen per architecture)")
    )
    towers: str = field(default="both", metadata=_help("towers that get adapters: both, image, text"))
    merge_at_end: bool = field(default=True, metadata=_help("merge adapters into the weights at the end"))

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.towers not in LORA_TOWERS:
            raise ValueError(f"LoRA towers must be one of {LORA_TOWERS}, got {self.towers!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("LoRA target_modules must name at least one module, or be None for the default")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        if d["target_modules"] is not None:
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        _check_keys(cls, data, "LoraSettings")
        return cls(**data)


@dataclass(frozen=True)
class FineTuneConfig:
    """Everything that decides how :func:`~ccclip_widgets.train.fine_tune` trains.

    Construct it with keyword arguments; invalid combinations raise ``ValueError`` with the reason.
    ``dataclasses.replace(config, lr=1e-4)`` makes a modified copy; ``to_dict``/``from_dict`` round-trip through
    JSON; every field is also a ``ccclip finetune`` flag (``--lr``, ``--lock-text``...).

    Attributes
    ----------
    epochs, max_steps
        Length of the run: passes over the posts, or optimizer steps (``max_steps`` wins when set).
    batch_size, grad_accum_steps
        Global contrastive batch, and batches per optimizer step.
    lr, weight_decay, adam_betas, adam_eps
        AdamW settings (``lr=None``: 1e-5 for full fine-tuning, 1e-4 for LoRA or projections only). Biases,
        norms, embeddings and the temperature get no weight decay.
    warmup_steps, warmup_fraction, schedule, min_lr_ratio
        Linear warm-up (steps, else a fraction of the run), then ``cosine``, ``linear`` or ``constant``.
    grad_clip, precision, seed, num_workers
        Gradient-norm clipping (``None``: off); ``auto``/``fp32``/``bf16``/``fp16`` autocast (fp16 with a
        gradient scaler, CUDA only); the seed of data order, augmentation and adapter init; decoding workers.
    lock_image, lock_text, unlock_last_image_blocks, unlock_last_text_blocks
        Freeze a tower; with a locked tower, still train its last N blocks and its head.
    train_projections_only, train_logit_scale, lora
        Train only the two output projections; learn the temperature; LoRA adapters (:class:`LoraSettings`).
    augment, mask_duplicates
        Mild random resized crop + flip; keep posts sharing an image or a text out of each other's negatives.
    eval_every_steps, eval_at_start, eval_batch_size
        When to evaluate on the held-out posts (0: each epoch end; always at the end).
    checkpoint_every_steps, keep_checkpoints
        Resumable checkpoints every N steps (0: only at the end), and how many are kept.
    early_stopping_metric, early_stopping_patience, early_stopping_mode, restore_best
        Stop after ``patience`` evaluations without improvement of a metric such as
        ``text_to_image/commentative/r_at_10``; end with the best weights.
    grad_checkpointing, channels_last, compile
        Memory and speed switches (``channels_last=None``: on for CUDA).
    max_nan_tolerance, show_progress
        Non-finite losses skipped before training stops with :class:`~.loop.TrainingDivergedError`; tqdm bar.
    read_every_steps
        How often the loss, temperature and gradient norm are read back to the host (``None``: every 10 steps
        on a GPU, every step elsewhere). On a GPU with fused AdamW a step whose loss or gradient norm is not
        finite is skipped on the device, so the host need not wait for each step; ``on_step`` callbacks then
        arrive in bursts of N and ``samples_per_s`` is the mean over the burst. Evaluations, checkpoints and
        the last step always read first.

    Notes
    -----
    ``batch_size`` is the *global* contrastive batch: the number of image-text pairs whose negatives are shared in
    one forward pass, whatever the number of processes (each of ``W`` processes holds ``batch_size / W`` pairs
    and the features are gathered). With ``grad_accum_steps = k`` an optimizer step sees ``k`` such batches,
    each with its own negatives. When the training set holds fewer usable posts than ``batch_size``, the batch
    is shrunk to the data size with a warning (a one-batch epoch), rather than failing.
    """

    # -- length
    epochs: int = field(
        default=10, metadata=_help("passes over the training posts (ignored with --max-steps)")
    )
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps to run (overrides --epochs)"))
    # -- optimization
    batch_size: int = field(default=64, metadata=_help("global contrastive batch (pairs sharing negatives)"))
    lr: float | None = field(
        default=None,
        metadata=_help("peak learning rate (default: 1e-5 full fine-tune, 1e-4 LoRA/projections)"),
    )
    weight_decay: float = field(
        default=0.1, metadata=_help("AdamW weight decay (not on biases, norms, gains)")
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.98), metadata=_help("AdamW betas"))
    adam_eps: float = field(default=1e-6, metadata=_help("AdamW epsilon"))
    warmup_steps: int | None = field(
        default=None, metadata=_help("linear warm-up steps (overrides fraction)")
    )
    warmup_fraction: float = field(default=0.05, metadata=_help("warm-up as a fraction of all steps"))
    schedule: str = field(
        default="cosine", metadata=_help("learning-rate schedule: cosine, linear, constant")
    )
    min_lr_ratio: float = field(default=0.0, metadata=_help("final learning rate as a fraction of the peak"))
    grad_accum_steps: int = field(default=1, metadata=_help("batches accumulated per optimizer step"))
    grad_clip: float | None = field(default=1.0, metadata=_help("clip the gradient norm to this (none: off)"))
    precision: str = field(
        default="auto", metadata=_help("auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    )
    seed: int = field(default=0, metadata=_help("seed for data order, augmentation and adapter init"))
    num_workers: int | None = field(
        default=None, metadata=_help("image-decoding worker processes (default: by data size and cores)")
    )
    # -- what trains
    lock_image: bool = field(default=False, metadata=_help("freeze the image tower"))
    lock_text: bool = field(default=False, metadata=_help("freeze the text tower"))
    unlock_last_image_blocks: int = field(
        default=0, metadata=_help("with --lock-image: train the last N image blocks and the image head")
    )
    unlock_last_text_blocks: int = field(
        default=0, metadata=_help("with --lock-text: train the last N text blocks and the text head")
    )
    train_projections_only: bool = field(
        default=False, metadata=_help("train only the two output projections (and the temperature)")
    )
    train_logit_scale: bool = field(default=True, metadata=_help("learn the temperature (logit scale)"))
    lora: LoraSettings | None = field(default=None, metadata=_help("LoRA adapters instead of full weights"))
    # -- data
    augment: bool = field(default=True, metadata=_help("mild image augmentation: random resized crop + flip"))
    mask_duplicates: bool = field(
        default=True, metadata=_help("do not use posts sharing an image or a text as each other's negatives")
    )
    # -- evaluation, checkpoints, early stopping
    eval_every_steps: int = field(default=0, metadata=_help("evaluate every N steps (0: at each epoch end)"))
    eval_at_start: bool = field(default=True, metadata=_help("evaluate before the first step (baseline)"))
    eval_batch_size: int = field(default=256, metadata=_help("batch size when embedding the eval posts"))
    checkpoint_every_steps: int = field(
        default=200, metadata=_help("checkpoint every N steps (0: only at end)")
    )
    keep_checkpoints: int = field(default=2, metadata=_help("resumable checkpoints kept (oldest deleted)"))
    early_stopping_metric: str | None = field(
        default=None, metadata=_help("metric to watch, e.g. text_to_image/commentative/r_at_10")
    )
    early_stopping_patience: int = field(default=3, metadata=_help("evaluations without improvement to stop"))
    early_stopping_mode: str = field(default="auto", metadata=_help("max, min, or auto (min for ranks)"))
    restore_best: bool = field(
        default=True, metadata=_help("end with the best weights when a metric is watched")
    )
    # -- throughput and guards
    grad_checkpointing: bool = field(default=False, metadata=_help("recompute activations (less memory)"))
    channels_last: bool | None = field(default=None, metadata=_help("channels-last images (default: on GPU)"))
    compile: bool = field(default=False, metadata=_help("torch.compile the model"))
    max_nan_tolerance: int = field(default=0, metadata=_help("non-finite losses skipped before giving up"))
    read_every_steps: int | None = field(
        default=None,
        metadata=_help(
            "read loss and temperature back to the host every N steps (default: 10 on GPU, 1 on CPU)"
        ),
    )
    show_progress: bool = field(default=True, metadata=_help("progress bar"))

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSettings.from_dict(self.lora))
        if isinstance(self.adam_betas, list):
            object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        problems = self._problems()
        if problems:
            raise ValueError("Invalid FineTuneConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p: list[str] = []

        def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                p.append(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")

        positive_int("epochs")
        positive_int("max_steps", allow_none=True)
        positive_int("batch_size")
        positive_int("grad_accum_steps")
        positive_int("warmup_steps", allow_none=True, allow_zero=True)
        positive_int("num_workers", allow_none=True, allow_zero=True)
        positive_int("unlock_last_image_blocks", allow_zero=True)
        positive_int("unlock_last_text_blocks", allow_zero=True)
        positive_int("eval_every_steps", allow_zero=True)
        positive_int("eval_batch_size")
        positive_int("checkpoint_every_steps", allow_zero=True)
        positive_int("keep_checkpoints")
        positive_int("early_stopping_patience")
        positive_int("max_nan_tolerance", allow_zero=True)
        positive_int("read_every_steps", allow_none=True)
        if self.batch_size < 2:
            p.append(
                f"batch_size must be at least 2 (a contrastive batch needs negatives), got {self.batch_size}"
            )
        if self.lr is not None and not (
            isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0
        ):
            p.append(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            p.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas)):
            p.append(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not self.adam_eps > 0:
            p.append(f"adam_eps must be positive, got {self.adam_eps!r}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            p.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            p.append(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            p.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"seed must be a non-negative int, got {self.seed!r}")
        if self.unlock_last_image_blocks and not self.lock_image:
            p.append(
                f"unlock_last_image_blocks={self.unlock_last_image_blocks} only applies to a locked image tower; "
                "set lock_image=True as well (or leave the tower unlocked to train all of it)"
            )
        if self.unlock_last_text_blocks and not self.lock_text:
            p.append(
                f"unlock_last_text_blocks={self.unlock_last_text_blocks} only applies to a locked text tower; "
                "set lock_text=True as well"
            )
        if self.train_projections_only and (self.lock_image or self.lock_text or self.lora is not None):
            p.append(
                "train_projections_only cannot be combined with lock_image/lock_text/lora (it already locks)"
            )
        if self.lora is not None and (self.lock_image or self.lock_text):
            p.append(
                "lora cannot be combined with lock_image/lock_text: with LoRA the base weights are frozen anyway; "
                "choose the adapted towers with LoraSettings(towers='image'|'text'|'both')"
            )
        if self.lora is not None and not isinstance(self.lora, LoraSettings):
            p.append(f"lora must be a LoraSettings or None, got {type(self.lora).__name__}")
        if (
            self.lock_image
            and self.lock_text
            and not (self.unlock_last_image_blocks or self.unlock_last_text_blocks)
            and not self.train_logit_scale
        ):
            p.append("lock_image and lock_text with nothing unlocked leave nothing to train")
        if self.early_stopping_mode not in ("auto", "max", "min"):
            p.append(f"early_stopping_mode must be auto, max or min, got {self.early_stopping_mode!r}")
        if self.early_stopping_metric is not None:
            parts = self.early_stopping_metric.split("/")
            if len(parts) < 3 or parts[0] not in ("image_to_text", "text_to_image"):
                p.append(
                    "early_stopping_metric must look like DIRECTION/GROUP/METRIC, e.g. "
                    f"'text_to_image/commentative/r_at_10' or 'image_to_text/all/median_rank'; "
                    f"got {self.early_stopping_metric!r}"
                )
        return p

    # ------------------------------------------------------------------------------------------- derived
    @property
    def resolved_lr(self) -> float:
        """``lr``, or its default: 1e-4 for LoRA or projections-only, 1e-5 when full weights train."""
        if self.lr is not None:
            return float(self.lr)
        return 1e-4 if (self.lora is not None or self.train_projections_only) else 1e-5

    @property
    def early_stopping_direction(self) -> str:
        """``"max"`` or ``"min"``: how the early-stopping metric improves."""
        if self.early_stopping_mode != "auto":
            return self.early_stopping_mode
        metric = (self.early_stopping_metric or "").rsplit("/", 1)[-1]
        return "min" if metric in _MIN_METRICS else "max"

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a run of ``total_steps`` optimizer steps."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return int(self.warmup_fraction * total_steps)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """The schedule as a multiple of the peak rate: ``lr_at(step, total) == resolved_lr * lr_factor(step, total)``.

        This is the function the trainer's :class:`torch.optim.lr_scheduler.LambdaLR` follows.
        """
        warm = self.warmup_for(total_steps)
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        if self.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``: warm-up, then the schedule.

        Parameters
        ----------
        step
            0-based optimizer step.
        total_steps
            Length of the run.

        Returns
        -------
        float
        """
        return self.resolved_lr * self.lr_factor(step, total_steps)

    # ------------------------------------------------------------------------------------------- (de)serialize
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict of every field (``lora`` nested, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LoraSettings):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FineTuneConfig:
        """Build a config from :meth:`to_dict` output (JSON). Unknown keys raise ``ValueError``.

        Parameters
        ----------
        data
            Field values; missing fields take their defaults.

        Returns
        -------
        FineTuneConfig
        """
        _check_keys(cls, data, "FineTuneConfig")
        data = dict(data)
        if isinstance(data.get("lora"), dict):
            data["lora"] = LoraSettings.from_dict(data["lora"])
        return cls(**data)


def _check_keys(cls: type, data: dict[str, Any], name: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {name} field(s): {unknown}. Known fields: {sorted(known)}")


# ================================================================================================ CLI mirroring
#: Fields without a generated flag: ``lora`` has its own group, ``show_progress`` is the CLI's ``--no-progress``.
_CLI_SKIP = ("lora", "show_progress")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else rest), True
    return tp, False


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null", "off"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`FineTuneConfig` field (and ``--lora``, ``--lora-r``... for LoRA) to ``parser``.

    Flags default to ``None`` (argparse ``SUPPRESS``), so :func:`config_from_args` only overrides what was given.

    Parameters
    ----------
    parser
        The parser (or argument group) to extend.
    """
    hints = typing.get_type_hints(FineTuneConfig)
    group = parser.add_argument_group("fine-tuning options")
    for f in fields(FineTuneConfig):
        if f.name in _CLI_SKIP:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default
        shown = "none" if default is None else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "adam_betas":
            group.add_argument(_flag(f.name), type=float, nargs=2, metavar=("B1", "B2"), **kwargs)
        else:
            kind = tp if tp in (int, float, str) else str
            kind_parse = _parse_optional(kind) if optional else kind
            choices = {"precision": PRECISIONS, "schedule": SCHEDULES}.get(f.name)
            group.add_argument(_flag(f.name), type=kind_parse, choices=choices, **kwargs)
    lora = parser.add_argument_group("LoRA options (peft)")
    lora.add_argument("--lora", action="store_true", default=argparse.SUPPRESS, help="train LoRA adapters")
    lora_hints = typing.get_type_hints(LoraSettings)
    for f in fields(LoraSettings):
        tp, _ = _unwrap_optional(lora_hints[f.name])
        dest = f"lora_{f.name}"
        help_text = f"{f.metadata.get('help', '')} (default: {f.default}; implies --lora)"
        kwargs = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            lora.add_argument(_flag(dest), action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name == "target_modules":
            lora.add_argument(_flag(dest), nargs="+", metavar="NAME", **kwargs)
        elif f.name == "towers":
            lora.add_argument(_flag(dest), choices=LORA_TOWERS, **kwargs)
        else:
            lora.add_argument(_flag(dest), type=tp, **kwargs)


def config_from_args(args: argparse.Namespace, base: FineTuneConfig | None = None) -> FineTuneConfig:
    """Build a :class:`FineTuneConfig` from parsed flags (see :func:`add_config_arguments`).

    Parameters
    ----------
    args
        Parsed arguments.
    base
        Defaults to start from (e.g. a config read from JSON); fields given as flags override it.

    Returns
    -------
    FineTuneConfig
    """
    data = (base or FineTuneConfig()).to_dict()
    values = vars(args)
    for f in fields(FineTuneConfig):
        if f.name not in _CLI_SKIP and f.name in values:
            v = values[f.name]
            data[f.name] = tuple(v) if isinstance(v, list) else v
    lora_given = {
        f.name: values[f"lora_{f.name}"] for f in fields(LoraSettings) if f"lora_{f.name}" in values
    }
    if values.get("lora") or lora_given:
        lora = dict(data["lora"] or LoraSettings().to_dict())
        lora.update(lora_given)
        data["lora"] = lora
    return FineTuneConfig.from_dict(data)
