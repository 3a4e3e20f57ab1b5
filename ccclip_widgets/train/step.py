"""One optimizer step of :func:`~.loop.fine_tune` and what feeds it.

What the loop works with (:class:`_LoopParts`: the data set, the loss, the wrapped and maybe compiled forward
pass), where a run is (:class:`_Position`), the batches from that position on, the forward and backward of each
global batch, the update (skipped on the device when the loss is not finite) and the deferred reading of the
steps' numbers on the host, which reports them (history, progress bar, ``on_step``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NonFiniteLossWarning, TrainingDivergedError
from . import checkpoint as ckpt
from .cached import HeadsForward, cached_batches, heads_only, tower_features
from .data import PairCollate, PairDataset, PreparedPosts, RunBatchSampler, default_train_workers, make_loader
from .distributed import mean_across_ranks
from .evaluation import _autocast
from .loss import ClipLoss
from .results import StepInfo

MAX_LOGIT_SCALE = math.log(100.0)


class _DualEncoder(nn.Module):
    """Forward = both towers + temperature, so DistributedDataParallel sees one module call per step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, texts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.model.encode_image(images), dim=-1)
        text_features = F.normalize(self.model.encode_text(texts), dim=-1)
        return image_features, text_features, self.model.logit_scale.exp()


@dataclass
class _Position:
    """Where a run is: counters saved in checkpoints, this session's clock and the steps not read yet."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0  # pairs trained this session
    samples_before: int = 0  # ...and before the resume
    elapsed_before: float = 0.0
    t_start: float = 0.0
    stopped: str = "finished"
    # Steps whose numbers the host has not read yet: (step, epoch, lr, readings, samples, start time).
    pending: list[tuple[int, int, float, Any, int, float]] = field(default_factory=list)


@dataclass
class _LoopParts:
    """What the loop works with, built once per run."""

    n_batches: int
    workers: int
    dataset: PairDataset
    normalise: Callable[[torch.Tensor], torch.Tensor]
    loss_fn: ClipLoss
    wrapper: nn.Module
    forward: Callable[..., Any]
    params: list[torch.Tensor]
    deferred: bool
    read_every: int
    show: bool
    pbar: Any = None


class _Stepping:
    """How :class:`~.loop._Trainer` feeds and takes its steps (a mixin: it works on the trainer's state)."""

    def _build_parts(
        self, train: PreparedPosts, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
    ) -> _LoopParts:
        """The run's length, the data set, the loss and the (wrapped, maybe compiled) forward pass."""
        cfg = self.config
        clip = self.clip
        dist = self.dist
        device = clip.device
        n = len(train)
        n_batches = n // self.batch
        workers = cfg.num_workers if cfg.num_workers is not None else default_train_workers(device, n)
        dataset = PairDataset(
            train.sources,
            clip.image_size,
            clip.preprocess,
            clip.preprocess_cfg,
            augment=cfg.augment,
            seed=cfg.seed,
            # next to a GPU the workers hand over uint8 pixels (a quarter of the bytes to move, pin and copy)
            normalize=device.type != "cuda",
        )
        wrapper: nn.Module = _DualEncoder(clip.model)
        # both towers frozen, no augmentation: encode each image and text once, then train only the heads
        self.cached = not dist.enabled and heads_only(clip.model, augment=cfg.augment, lora=cfg.lora)
        if self.cached:
            self.train_features = tower_features(
                clip,
                train,
                batch_size=cfg.eval_batch_size,
                num_workers=workers,
                precision=self.precision,
                show_progress=cfg.show_progress and dist.is_main,
            )
            wrapper = HeadsForward(clip.model)
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            wrapper = DistributedDataParallel(wrapper, device_ids=ids)
        # With fused AdamW and no gradient scaler a non-finite step is skipped on the device, so the host reads
        # the numbers only every ``read_every`` steps (and before evaluations, checkpoints and the end).
        deferred = bool(optimizer.defaults.get("fused")) and not scaler.is_enabled()
        return _LoopParts(
            n_batches=n_batches,
            workers=workers,
            dataset=dataset,
            normalise=dataset.device_normaliser(device),
            loss_fn=ClipLoss(rank=dist.rank, world_size=dist.world_size),
            wrapper=wrapper,
            forward=torch.compile(wrapper) if cfg.compile else wrapper,
            params=[p for p in clip.model.parameters() if p.requires_grad],
            deferred=deferred,
            read_every=(cfg.read_every_steps or 10) if deferred else 1,
            show=cfg.show_progress and dist.is_main,
        )

    def _progress_bar(self, parts: _LoopParts, pos: _Position) -> Any:
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total,
            initial=pos.step,
            desc="fine-tune",
            unit="step",
            disable=not parts.show,
            dynamic_ncols=True,
        )

    def _make_batches(self, train: PreparedPosts, parts: _LoopParts, pos: _Position) -> Any:
        """An iterator over the run's batches from the current position on (cached features or a loader)."""
        cfg = self.config
        if pos.batch_in_epoch >= parts.n_batches:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        sampler = RunBatchSampler(
            len(train),
            self.batch,
            cfg.seed,
            pos.epoch,
            pos.batch_in_epoch,
            self.dist.rank,
            self.dist.world_size,
        )
        if self.cached:
            return iter(cached_batches(self.train_features, train, sampler))
        loader = make_loader(
            parts.dataset,
            sampler,
            num_workers=parts.workers,
            pin_memory=self.clip.device.type == "cuda",
            seed=cfg.seed,
            collate_fn=PairCollate(train.tokens, train.image_ids, train.text_ids),
        )
        return iter(loader)

    def _micro_batch(
        self,
        train: PreparedPosts,
        parts: _LoopParts,
        batch: tuple,
        sync: contextlib.AbstractContextManager,
        group: int,
        scaler: torch.amp.GradScaler,
    ) -> torch.Tensor:
        """Forward and backward of one global batch (this rank's slice); returns its loss (detached)."""
        cfg = self.config
        device = self.clip.device
        rows, pixels, valid, reasons, tokens, img_ids, txt_ids = batch
        if any(reasons):
            for r, why in zip(rows.tolist(), reasons, strict=True):
                if why:
                    self.failures.setdefault(str(train.table["post_id"][r]), why)
        # every tensor comes pinned from the loader: these copies do not wait for the GPU
        pixels = pixels.to(device, non_blocking=True)
        if self.channels_last and pixels.ndim == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if pixels.dtype == torch.uint8:  # augmented images travel as bytes: normalise here
            pixels = parts.normalise(pixels)
        tokens = tokens.to(device, non_blocking=True)
        with sync:
            with _autocast(device, self.precision):
                img_f, txt_f, scale = parts.forward(pixels, tokens)
            loss = parts.loss_fn(
                img_f,
                txt_f,
                scale,
                valid=valid.to(device, non_blocking=True),
                image_ids=img_ids.to(device, non_blocking=True) if cfg.mask_duplicates else None,
                text_ids=txt_ids.to(device, non_blocking=True) if cfg.mask_duplicates else None,
            )
            scaler.scale(loss / group).backward()
        return loss.detach()

    def _train_step(
        self,
        train: PreparedPosts,
        parts: _LoopParts,
        pos: _Position,
        batches: Any,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
    ) -> None:
        """One optimizer step: ``grad_accum_steps`` global batches, clipping, the update (or its skip)."""
        cfg = self.config
        clip = self.clip
        device = clip.device
        t0 = time.perf_counter()
        group = min(cfg.grad_accum_steps, parts.n_batches - pos.batch_in_epoch)
        loss_acc = torch.zeros((), device=device)
        for micro in range(group):
            batch = next(batches)
            pos.batch_in_epoch += 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and micro < group - 1:
                sync = parts.wrapper.no_sync()  # type: ignore[operator]
            loss_acc += self._micro_batch(train, parts, batch, sync, group, scaler) / group
        pos.samples += self.batch * group
        step_lr = float(optimizer.param_groups[0]["lr"])  # the schedule's: cfg.lr_at(step, total)
        norm = None
        if cfg.grad_clip is not None:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(parts.params, cfg.grad_clip)
        # loss, temperature (and gradient norm) before the update, as one device tensor
        readings = [mean_across_ranks(loss_acc), clip.model.logit_scale.detach().float().exp()]
        if norm is not None:
            readings.append(norm.detach().float())
        reading = torch.stack([r.reshape(()).float().to(device) for r in readings])
        if parts.deferred:
            # fused AdamW skips the whole update on the device when found_inf is 1 (a non-finite loss or
            # gradient norm), so the host need not wait for this step's numbers
            optimizer.found_inf = (~torch.isfinite(reading[0::2]).all()).float()
            optimizer.step()
            values: Any = reading
        else:
            # the one host-device sync of a step: the numbers decide whether to update
            values = reading.tolist()
            bad = not math.isfinite(values[0])
            if not bad and norm is not None and not math.isfinite(values[2]):
                # fp16 overflow is the scaler's business (it skips the update itself)
                bad = self.precision != "fp16"
            if not bad:
                scaler.step(optimizer)
                scaler.update()
        if getattr(clip.model, "logit_scale", None) is not None:
            with torch.no_grad():  # a skipped update left it in range already
                clip.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first update is no misuse of the scheduler
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            self.scheduler.step()
        pos.step += 1
        pos.pending.append((pos.step, pos.epoch, step_lr, values, self.batch * group, t0))

    def _settle(self, parts: _LoopParts, pos: _Position) -> None:
        """Read the numbers of the steps not read yet; report them (history, progress bar, ``on_step``)."""
        pending = pos.pending
        if not pending:
            return
        cfg = self.config
        if parts.deferred:  # the one host-device sync of a burst of steps
            rows = torch.stack([p[3] for p in pending]).tolist()
        else:
            rows = [p[3] for p in pending]
        now = time.perf_counter()
        window_s = now - pending[0][5]
        window_samples = sum(p[4] for p in pending)
        rate = window_samples / window_s if window_s > 0 else float("nan")
        entries = list(pending)
        pending.clear()
        for (at, ep, lr_used, _, _, _), values in zip(entries, rows, strict=True):
            loss_sum, scale_now = values[0], values[1]
            grad_norm = values[2] if len(values) > 2 else None
            bad_loss = None if math.isfinite(loss_sum) else loss_sum
            if bad_loss is None and grad_norm is not None and not math.isfinite(grad_norm):
                if self.precision != "fp16":  # fp16 overflow is the scaler's business (it skips)
                    bad_loss = grad_norm
            if bad_loss is not None:
                self.nan_count += 1
                if self.nan_count > cfg.max_nan_tolerance:
                    found = ckpt.list_checkpoints(self.out) if self.out is not None else []
                    last = found[-1] if found else None
                    if self.out is not None and self.dist.is_main:
                        self._write_run_file("diverged", at, last)
                    raise TrainingDivergedError(at, bad_loss, last, self.nan_count)
                warnings.warn(
                    f"Non-finite loss ({bad_loss}) at step {at}; step skipped "
                    f"({self.nan_count}/{cfg.max_nan_tolerance} tolerated).",
                    NonFiniteLossWarning,
                    stacklevel=5,
                )
            info = StepInfo(
                step=at,
                total_steps=self.total,
                epoch=ep,
                loss=loss_sum if bad_loss is None else float("nan"),
                lr=lr_used,
                logit_scale=scale_now,
                samples_per_s=rate,
                grad_norm=grad_norm,
                skipped=bad_loss is not None,
                elapsed_s=pos.elapsed_before + now - pos.t_start,
            )
            self.history.append(dataclasses.asdict(info))
            parts.pbar.update(1)
            if parts.show:
                parts.pbar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
            if self.dist.is_main and self.on_step is not None:
                self.on_step(info)
