"""What a fine-tuning run writes, and how it ends.

While a run goes: resumable checkpoints, ``best/`` and ``run.json`` (the files themselves are
:mod:`.checkpoint`'s business; :class:`_Saving` gathers the trainer's state for it). At the end: the best
weights restored, LoRA adapters merged, ``final/`` written, the skipped posts gathered from every rank and the
:class:`~.results.FineTuneResult` built.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import torch

from ..errors import TrainingWarning
from . import checkpoint as ckpt
from .data import PreparedPosts
from .distributed import barrier
from .lora import adapter_state, load_adapter, save_adapter
from .results import _SKIP_SCHEMA, FineTuneResult


class _Saving:
    """How :class:`~.loop._Trainer` saves and finishes a run (a mixin: it works on the trainer's state)."""

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
