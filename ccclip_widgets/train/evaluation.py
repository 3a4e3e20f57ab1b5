"""Evaluation during fine-tuning: :func:`evaluate_in_memory` and the trainer's evaluation step.

The step (:class:`_Evaluating`, mixed into :class:`~.loop._Trainer`) scores the held-out posts on rank 0, keeps
the best weights, decides early stopping and calls ``on_eval``; the autocast/precision helpers here are shared
with the loop.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from ..models import ClipModel
from .cached import tower_features
from .data import PairDataset, PreparedPosts, default_train_workers, make_loader
from .freeze import freeze_locked_batchnorm
from .metrics import metrics_frame, post_groups, retrieval_metrics
from .results import EvalInfo, EvalVectors


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (the model is on {device}); use 'bf16' or 'fp32'"
        )
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_in_memory(
    clip: ClipModel,
    data: PreparedPosts,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
    features: Any | None = None,
    vectors_out: list[EvalVectors] | None = None,
) -> tuple[dict[str, float], int]:
    """Embed the evaluation posts with the current weights and score retrieval both ways, per group.

    Parameters
    ----------
    clip
        The model (evaluated as it is, adapters included).
    data
        From :func:`~.data.prepare_posts`.
    batch_size
        Images or texts per forward pass.
    num_workers
        Decoding workers.
    precision
        ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast.
    features
        The posts' frozen tower outputs (:func:`~.cached.tower_features`): only the heads run.
    vectors_out
        A list that receives the scored vectors (:class:`EvalVectors`), for callers that show them too.

    Returns
    -------
    (metrics, n_failed)
        Flat metrics (see :mod:`.metrics`; the same numbers as
        :func:`~ccclip_widgets.evaluate.evaluate_retrieval` with ``pool="all"`` on these vectors) and the number of
        posts left out because their image failed to decode.
    """
    model = clip.model
    was_training = model.training
    model.eval()
    image_ids = data.image_ids.numpy()
    text_ids = data.text_ids.numpy()
    if features is not None:
        from .cached import project

        try:
            img_feats, txt_feats = project(model, features)
        finally:
            model.train(was_training)
            if was_training:
                freeze_locked_batchnorm(model)
        ok = features.image_ok.cpu()
    else:
        img_feats, txt_feats, ok = _encode_eval(clip, data, batch_size, num_workers, precision, was_training)
    good_image = ok.numpy()[image_ids]  # image_ids are 0..I-1 in order of first appearance == sorted keys
    # posts whose image failed are neither queries nor candidates
    groups = {k: v[good_image] for k, v in post_groups(data.table).items()}
    img_np, txt_np = img_feats.numpy(), txt_feats.numpy()
    metrics = retrieval_metrics(img_np, txt_np, image_ids[good_image], text_ids[good_image], groups)
    if vectors_out is not None:
        vectors_out.append(EvalVectors(data.table, img_np[image_ids], txt_np[text_ids], good_image))
    return metrics, int((~good_image).sum())


def _encode_eval(
    clip: ClipModel,
    data: PreparedPosts,
    batch_size: int,
    num_workers: int,
    precision: str,
    was_training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = clip.model
    device = clip.device
    try:
        image_ids = data.image_ids.numpy()
        text_ids = data.text_ids.numpy()
        first_img = {int(v): i for i, v in reversed(list(enumerate(image_ids)))}
        first_txt = {int(v): i for i, v in reversed(list(enumerate(text_ids)))}
        img_rows = [first_img[k] for k in sorted(first_img)]
        txt_rows = [first_txt[k] for k in sorted(first_txt)]
        dataset = PairDataset(
            data.sources, clip.image_size, clip.preprocess, clip.preprocess_cfg, augment=False, seed=0
        )
        batches = [
            [(r, 0) for r in img_rows[s : s + batch_size]] for s in range(0, len(img_rows), batch_size)
        ]
        loader = make_loader(dataset, batches, num_workers=num_workers, pin_memory=False, seed=0)
        img_feats = torch.zeros(len(img_rows), clip.embed_dim)
        ok = torch.ones(len(img_rows), dtype=torch.bool)
        pos = 0
        for _, pixels, valid, _ in loader:
            pixels = pixels.to(device, non_blocking=True)
            with _autocast(device, precision):
                feats = model.encode_image(pixels)
            img_feats[pos : pos + len(pixels)] = F.normalize(feats.float(), dim=-1).cpu()
            ok[pos : pos + len(pixels)] = valid
            pos += len(pixels)
        txt_feats = torch.zeros(len(txt_rows), clip.embed_dim)
        for s in range(0, len(txt_rows), batch_size):
            tokens = data.tokens[txt_rows[s : s + batch_size]].to(device, non_blocking=True)
            with _autocast(device, precision):
                feats = model.encode_text(tokens)
            txt_feats[s : s + len(tokens)] = F.normalize(feats.float(), dim=-1).cpu()
    finally:
        model.train(was_training)
        if was_training:
            freeze_locked_batchnorm(model)
    return img_feats, txt_feats, ok


class _Evaluating:
    """How :class:`~.loop._Trainer` evaluates during a run (a mixin: it works on the trainer's state)."""

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
