"""The FineTune panel's worker side: what runs in the background threads, and how it records what happened.

A mixin of :class:`~ccclip_widgets.widgets.finetune.FineTune`, kept apart from the panel's public face (settings,
callbacks, start/stop/wait): a run's folder and fresh model copy, the training thread's body around
:func:`ccclip_widgets.train.fine_tune` and its step and evaluation hooks, re-embedding with the result, and the
status, phase and error records they leave for the view. Like the panel state, it imports no widget library.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._finetune_run import duration, eta_seconds, hint, live_embeddings, step_message
from ._finetune_settings import preparing_phase

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..posts import Posts
    from ..train import EvalInfo, FineTuneConfig, FineTuneResult, StepInfo

log = logging.getLogger(__name__)

__all__ = ["FineTuneWorker"]


class FineTuneWorker:
    """Mixin: needs the panel's inputs (``base_model``, ``train_posts``, ``eval_posts``, ``out_dir``, ``store``,
    ``device``, ``allow_random``), its records (``_lock``, ``_status``, ``_message``, ``_phase``, ``_total``,
    ``history``, ``result``, ...), ``checkpoint``, ``_fire`` and ``_changed`` from :class:`FineTune`."""

    base_model: ClipModel | str
    train_posts: Posts
    eval_posts: Posts | None
    out_dir: Path | None
    store: str | Path | None
    device: str | None
    allow_random: bool
    _lock: threading.RLock
    _status: str
    _message: str
    _phase: str
    _phase_since: float
    _stop_event: threading.Event
    _training: ClipModel | None
    _run_dir: Path | None
    _total: int
    _reembedding: bool
    _callbacks: dict[str, list[Callable[..., Any]]]
    history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    result: FineTuneResult | None
    error: BaseException | None
    error_hint: str
    error_trace: str
    embeddings: Embeddings | None
    tuned_model: ClipModel | None
    checkpoint: Path | None
    _fire: Callable[..., None]
    _changed: Callable[..., None]

    # ---------------------------------------------------------------------------------------------- worker
    def _new_run_dir(self) -> Path:
        if self.out_dir is None:
            from .._io import default_cache_dir

            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            return default_cache_dir() / "finetune" / f"run-{stamp}"
        folder, i = self.out_dir, 2
        while folder.exists() and any(folder.iterdir()):
            folder, i = self.out_dir.with_name(f"{self.out_dir.name}-{i}"), i + 1
        return folder

    def _fresh_model(self) -> ClipModel:
        from ..models import ClipModel, load_model

        base = self.base_model
        if isinstance(base, ClipModel):
            return dataclasses.replace(
                base, model=copy.deepcopy(base.model), provenance=copy.deepcopy(base.provenance)
            )
        return load_model(base, device=self.device, allow_random=self.allow_random)

    def _run(self, config: FineTuneConfig, resume_from: Path | None) -> None:
        from .. import train

        try:
            self._training = clip = self._fresh_model()
            self._set_phase(preparing_phase(config, len(self.train_posts)))
            result = train.fine_tune(
                clip,
                self.train_posts,
                config,
                eval_posts=self.eval_posts,
                on_step=self._on_step,
                on_eval=self._on_eval,
                resume_from=resume_from,
                out_dir=self._run_dir,
                stop_event=self._stop_event,
            )
        except BaseException as exc:  # every failure must reach the panel
            log.exception("fine-tuning failed")
            self._fail(exc)
            return
        finally:
            self._training = None
            self._set_phase("")
        status = "stopped" if result.stopped == "user" else "finished"
        loss = next((h["loss"] for h in reversed(result.history) if not h.get("skipped")), float("nan"))
        how = {"early_stopping": " (early stopping)", "user": " by Stop"}.get(result.stopped, "")
        with self._lock:
            self.result = result  # set before the status, so anyone who sees "stopped" finds the result
        self._set_status(
            status,
            f"{status}{how}: {result.steps}/{result.total_steps} steps in {duration(result.elapsed_s)}, "
            f"final loss {loss:.4f}",
        )
        self._changed("loss", "evals", "progress", "checkpoint")
        self._fire("finished", result)

    def _on_step(self, info: StepInfo) -> None:
        with self._lock:
            self.history.append(dataclasses.asdict(info))
            self._total = info.total_steps
            self._phase = ""
            if self._status == "running":
                self._message = step_message(info, eta_seconds(self.history, self._total))
        self._changed("status", "progress", "loss")
        self._fire("step", info)

    def _on_eval(self, info: EvalInfo) -> None:
        with self._lock:
            self.eval_history.append({"step": info.step, "epoch": info.epoch, **info.metrics})
            if info.step == 0 and self._status == "running":
                self._set_phase(f"evaluated the base model; training {self._total} steps", notify=False)
        self._changed("evals", "status")
        self._fire("eval", info)
        with self._lock:
            live = bool(self._callbacks["live_embeddings"])
        if live and info.vectors is not None and self.eval_posts is not None:
            try:
                emb = live_embeddings(
                    self.eval_posts, info, getattr(self.base_model, "spec", str(self.base_model))
                )
            except Exception:  # a live preview must never stop the training
                log.warning("could not hand the evaluation vectors to the live listeners", exc_info=True)
                return
            self._fire("live_embeddings", emb, info)

    def _reembed(self, posts: Posts) -> Embeddings | None:
        from ..embed import embed_posts
        from ..models import CHECKPOINT_META, load_model

        result = self.result
        assert result is not None
        with self._lock:
            self._message = f"re-embedding {len(posts)} posts with the fine-tuned model ..."
        self._changed("status")
        try:
            folder = self.checkpoint
            if folder is not None and (Path(folder) / CHECKPOINT_META).is_file():
                model = load_model(folder, device=result.model.device)
            else:  # e.g. LoRA adapters of a stopped run: not a loadable model folder
                model = dataclasses.replace(
                    result.model, spec=f"{result.model.spec} fine-tuned ({result.steps} steps, in memory)"
                )
            emb = embed_posts(posts, model, store=self.store, show_progress=False)
        except Exception as exc:  # shown in the panel
            log.exception("re-embedding failed")
            self._reembedding = False
            self._fail(exc, keep_status=True)
            self._changed("reembed")
            return None
        self.embeddings, self.tuned_model = emb, model
        with self._lock:
            self._message = (
                f"re-embedded {len(emb)} posts with {model.spec} (fingerprint {model.fingerprint[:12]})"
            )
        self._reembedding = False
        self._changed("status", "reembed")
        self._fire("reembedded", emb, model)
        return emb

    # ---------------------------------------------------------------------------------------------- status
    def _set_status(self, status: str, message: str) -> None:
        with self._lock:
            self._status = status
            self._message = message
        self._changed("status")

    def _tick(self) -> None:
        if self._phase:  # the phase's elapsed time moves once a second
            self._changed("status")

    def _set_phase(self, phase: str, notify: bool = True) -> None:
        with self._lock:
            self._phase = phase
            self._phase_since = time.monotonic()
        if notify:
            self._changed("status")

    def _fail(self, exc: BaseException, keep_status: bool = False) -> None:
        self.error = exc
        self.error_hint = hint(exc)
        self.error_trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if not keep_status:
            self._set_status("failed", f"failed: {type(exc).__name__}")
        self._changed("error")

    def _clear_error(self) -> None:
        self.error = None
        self.error_hint = ""
        self.error_trace = ""
        self._changed("error")
