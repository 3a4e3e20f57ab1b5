"""The FineTune panel: contrastive fine-tuning (C-CLIP) from a notebook, with live loss and recall curves.

:class:`FineTune` is the panel's state: a plain Python object around :func:`ccclip_widgets.train.fine_tune`
that imports no widget library. It holds the settings (epochs, batch size, learning rate, what trains), runs
training in a background thread, and keeps what the panel shows: status and phase, progress with an estimate of
the time left, the loss per step, Recall@k per caption kind at every evaluation, the checkpoint, the error. Its
view (:mod:`._finetune_view`, built on first use of :attr:`FineTune.widget`) only draws that state and forwards
clicks; every change reaches it through one update path (:meth:`FineTune.on_change`). What runs in the
background threads is in :mod:`._finetune_worker`; pieces holding no panel state in :mod:`._finetune_run`.

Every run starts from a copy of the base model, so the base stays untouched and pressing Start twice trains
twice from the same starting point.

Waiting from a notebook::

    ft = FineTune(model, train_posts, eval_posts=test_posts).configure(epochs=3, trains="heads")
    ft.start()
    await ft.wait_async()   # the panel's buttons (Stop) keep working while the cell waits
    ft.wait()               # the same for scripts; buttons answer only after it returns

Interrupting the kernel while either waits stops the run after its current step (a resumable checkpoint is
kept), waits for it, and returns: :attr:`FineTune.result` is set, the status is ``"stopped"`` and the notebook
goes on with the next cell.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import TrainingInterruptedError
from ._common import ViewDisplay, register_callback
from ._finetune_run import (
    Job,
    duration,
    eta_seconds,
    loss_points,
    recall_series,
    wait_done,
    wait_done_async,
)
from ._finetune_settings import SETTINGS, TRAINS, FineTuneSettings, estimate_total
from ._finetune_worker import FineTuneWorker

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..posts import Posts
    from ..train import EvalInfo, FineTuneConfig, FineTuneResult, StepInfo

log = logging.getLogger(__name__)

__all__ = ["SETTINGS", "STATUSES", "TRAINS", "FineTune"]

#: Values of :attr:`FineTune.status`.
STATUSES: tuple[str, ...] = ("idle", "running", "stopping", "finished", "stopped", "failed")
#: Seconds an interrupted wait gives the run to stop (it stops after its current step).
INTERRUPT_GRACE_S = 300.0
_EVENTS = ("step", "eval", "finished", "reembedded", "live_embeddings", "change")


def _default_config() -> FineTuneConfig:
    from ..train import FineTuneConfig

    # The engine's defaults, minus its console progress bar (this panel has its own).
    return FineTuneConfig(show_progress=False)


class FineTune(FineTuneWorker, ViewDisplay):
    """A notebook panel that fine-tunes a CLIP model on posts and shows the run live.

    Parameters
    ----------
    model
        The base :class:`~ccclip_widgets.models.ClipModel`, or a spec for
        :func:`~ccclip_widgets.models.load_model`. Each run trains a fresh copy of it.
    train_posts
        Training pairs (a :class:`~ccclip_widgets.posts.Posts`), typically commentative posts of the train split.
    eval_posts
        Held-out posts scored during training (the Recall@k curves, live updates of a connected Gap view).
    posts
        Posts that :meth:`reembed` embeds with the fine-tuned model (default: ``eval_posts``, else
        ``train_posts``).
    config
        Starting :class:`~ccclip_widgets.train.FineTuneConfig`; the panel's controls override epochs, steps,
        batch size, learning rate, what trains and the evaluation interval. Default: the engine's defaults.
    out_dir
        Folder for checkpoints and ``final/`` (default: a new folder under the toolkit cache per run). A folder
        that already holds a run is not overwritten: the next free ``out_dir-2``, ``out_dir-3``... is used.
    store
        Embedding store for re-embedding (default: the toolkit cache).
    device
        Device for a model given as a spec.
    allow_random
        Passed to :func:`~ccclip_widgets.models.load_model` for a spec.
    curve_ks
        Recall@k values drawn in the recall chart.

    Attributes
    ----------
    result
        The :class:`~ccclip_widgets.train.FineTuneResult` of the last run that ended (``None`` before).
    error
        The exception of the last failed run (``None`` otherwise).
    history, eval_history
        One dict per optimizer step (``StepInfo`` fields) and per evaluation (``step``, ``epoch``, flat metrics).
    embeddings, tuned_model
        The :class:`~ccclip_widgets.embed.Embeddings` and model of the last re-embedding.
    """

    def __init__(
        self,
        model: ClipModel | str,
        train_posts: Posts,
        *,
        eval_posts: Posts | None = None,
        posts: Posts | None = None,
        config: FineTuneConfig | None = None,
        out_dir: str | Path | None = None,
        store: str | Path | None = None,
        device: str | None = None,
        allow_random: bool = False,
        curve_ks: tuple[int, ...] = (5, 10),
    ) -> None:
        self.base_model = model
        self.train_posts = train_posts
        self.eval_posts = eval_posts
        self.posts = posts if posts is not None else (eval_posts if eval_posts is not None else train_posts)
        self._settings = FineTuneSettings(config if config is not None else _default_config())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.store = store
        self.device = device
        self.allow_random = allow_random
        self.curve_ks = tuple(int(k) for k in curve_ks)

        self._lock = threading.RLock()
        self._status = "idle"
        self._message = "Press Start to fine-tune."
        self._phase = ""
        self._phase_since = time.monotonic()
        self._started_at: float | None = None
        self._run_job: Job | None = None
        self._embed_job: Job | None = None
        self._stop_event = threading.Event()
        self._training: ClipModel | None = None
        self._run_dir: Path | None = None
        self._total = 0
        self._blocking_waits = 0
        self._reembedding = False
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.result: FineTuneResult | None = None
        self.error: BaseException | None = None
        self.error_hint = ""
        self.error_trace = ""
        self.embeddings: Embeddings | None = None
        self.tuned_model: ClipModel | None = None
        self._callbacks: dict[str, list[Callable[..., Any]]] = {e: [] for e in _EVENTS}
        self._view: Any = None

    # ---------------------------------------------------------------------------------------------- settings
    def configure(self, **settings: Any) -> FineTune:
        """Change the settings the controls show.

        Parameters
        ----------
        **settings
            Any of ``epochs`` (int), ``max_steps`` (int; 0 or None: run ``epochs``), ``batch_size`` (int),
            ``lr`` (float, or None for the engine's default for what trains), ``trains`` (a key of :data:`TRAINS`),
            ``unlock_blocks`` (int: with one locked tower, train its last N blocks), ``eval_every_steps`` (int;
            0: at each epoch end).

        Returns
        -------
        FineTune
            ``self``, for chaining.
        """
        self._settings.update(**settings)
        self._changed("settings")
        return self

    @property
    def base_config(self) -> FineTuneConfig:
        """The config given at construction (the settings apply on top of it)."""
        return self._settings.base

    @property
    def settings(self) -> dict[str, Any]:
        """The current settings (see :meth:`configure`)."""
        return self._settings.values

    @property
    def config(self) -> FineTuneConfig:
        """The :class:`~ccclip_widgets.train.FineTuneConfig` that Start would use (validated; may raise)."""
        return self._settings.config

    @property
    def shown_lr(self) -> float:
        """The learning rate Start would use (the engine's default for what trains unless set)."""
        return self._settings.shown_lr

    # ---------------------------------------------------------------------------------------------- callbacks
    def _register(self, event: str, callback: Callable[..., Any], remove: bool) -> FineTune:
        with self._lock:
            register_callback(self._callbacks[event], callback, remove)
        return self

    def on_step(self, callback: Callable[[StepInfo], Any], remove: bool = False) -> FineTune:
        """Call ``callback(step_info)`` after every optimizer step (from the training thread). Returns ``self``."""
        return self._register("step", callback, remove)

    def on_eval(self, callback: Callable[[EvalInfo], Any], remove: bool = False) -> FineTune:
        """Call ``callback(eval_info)`` after every evaluation on ``eval_posts`` (training thread). Returns ``self``."""
        return self._register("eval", callback, remove)

    def on_finished(self, callback: Callable[[FineTuneResult], Any], remove: bool = False) -> FineTune:
        """Call ``callback(result)`` when a run ends without error (finished, early-stopped or stopped)."""
        return self._register("finished", callback, remove)

    def on_reembedded(
        self, callback: Callable[[Embeddings, ClipModel], Any], remove: bool = False
    ) -> FineTune:
        """Call ``callback(embeddings, model)`` when the posts have been re-embedded with the fine-tuned model."""
        return self._register("reembedded", callback, remove)

    def on_live_embeddings(
        self, callback: Callable[[Embeddings, EvalInfo], Any], remove: bool = False
    ) -> FineTune:
        """Call ``callback(embeddings, eval_info)`` at every evaluation with ``eval_posts`` as the model being
        trained encodes them (the vectors the evaluation scored: nothing is encoded twice). Used by
        :meth:`Gap.connect`. Returns ``self``."""
        return self._register("live_embeddings", callback, remove)

    def on_change(self, callback: Callable[[set[str]], Any], remove: bool = False) -> FineTune:
        """Call ``callback(parts)`` whenever the shown state changes; ``parts`` names what changed (``status``,
        ``progress``, ``loss``, ``evals``, ``settings``, ``error``, ``checkpoint``, ``reembed``). The view's one
        update path. Returns ``self``."""
        return self._register("change", callback, remove)

    def connect(self, view: Any, name: str = "fine-tuned", **kwargs: Any) -> FineTune:
        """Let ``view`` follow this panel (anything with ``connect(finetune, name)``, e.g. a Gap view)."""
        if not hasattr(view, "connect"):
            raise TypeError(
                f"{type(view).__name__} has no connect(finetune) method; use ft.on_reembedded(callback) to receive "
                "the new embeddings and model"
            )
        view.connect(self, name=name, **kwargs)
        return self

    def _fire(self, event: str, *args: Any) -> None:
        with self._lock:
            cbs = list(self._callbacks[event])
        for cb in cbs:
            try:
                cb(*args)
            except Exception:  # a listener's bug must not kill the training run
                log.exception("a %s callback of the FineTune panel failed", event)

    def _changed(self, *parts: str) -> None:
        self._fire("change", set(parts))

    # ---------------------------------------------------------------------------------------------- state
    @property
    def status(self) -> str:
        """One of :data:`STATUSES`: ``idle``, ``running``, ``stopping``, ``finished``, ``stopped``, ``failed``."""
        return self._status

    @property
    def message(self) -> str:
        """The status line's text: the phase and its elapsed time, or step, loss, speed and time left."""
        with self._lock:
            status, message, phase = self._status, self._message, self._phase
            since = self._phase_since
        if status in ("running", "stopping") and phase:
            return f"{phase} ({duration(time.monotonic() - since)})"
        return message

    @property
    def running(self) -> bool:
        """True while a training run is in progress."""
        job = self._run_job
        return job is not None and not job.done.is_set()

    @property
    def waiting(self) -> bool:
        """True while a cell blocks in :meth:`wait` (the notebook cannot receive clicks until it returns)."""
        return self._blocking_waits > 0

    @property
    def reembedding(self) -> bool:
        """True while :meth:`reembed` runs."""
        return self._reembedding

    @property
    def checkpoint(self) -> Path | None:
        """Folder of the fine-tuned model when a run has ended: ``final/``, or the last checkpoint when stopped."""
        r = self.result
        if r is None:
            return None
        return r.final_dir or r.last_checkpoint or r.best_dir

    @property
    def run_dir(self) -> Path | None:
        """Output folder of the current or last run."""
        return self._run_dir

    @property
    def total_steps(self) -> int:
        """Planned steps of the current or last run."""
        return self._total

    @property
    def steps_done(self) -> int:
        """Optimizer steps done in the current or last run."""
        with self._lock:
            return int(self.history[-1]["step"]) if self.history else 0

    @property
    def eta_s(self) -> float | None:
        """Estimated seconds until the run ends (from the pace of its recent steps; ``None`` before two steps)."""
        if self._status not in ("running", "stopping"):
            return None
        with self._lock:
            return eta_seconds(self.history, self._total)

    def loss_points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, losses)`` of the run so far (one point per optimizer step)."""
        with self._lock:
            return loss_points(self.history)

    def recall_series(self) -> list[dict[str, Any]]:
        """The recall chart's lines (see :func:`._finetune_run.recall_series`): per caption kind, then chance."""
        with self._lock:
            evals = list(self.eval_history)
        return recall_series(evals, self.curve_ks)

    # ---------------------------------------------------------------------------------------------- actions
    def start(self, block: bool = False, *, resume: bool = False) -> FineTune:
        """Start a training run in a background thread (what the Start button does).

        Parameters
        ----------
        block
            Wait until the run ends (:meth:`wait`).
        resume
            Continue the last stopped run from its checkpoint (same settings and posts) instead of starting over.

        Returns
        -------
        FineTune
            ``self``. A configuration error is shown in the error panel (status ``failed``), not raised.
        """
        with self._lock:
            if self.running:
                raise RuntimeError("a fine-tuning run is already in progress; press Stop first")
            self._clear_error()
            try:
                config = self.config
            except (ValueError, TypeError) as exc:
                self._fail(exc)
                return self
            resume_from = None
            if resume:
                last = self.result
                if (
                    self._run_dir is None
                    or last is None
                    or last.stopped != "user"
                    or last.last_checkpoint is None
                ):
                    self._fail(RuntimeError("there is no stopped run with a checkpoint to resume"))
                    return self
                resume_from = self._run_dir
            else:
                self._run_dir = self._new_run_dir()
                self.history = []
                self.eval_history = []
            self.result = None
            self._stop_event = threading.Event()
            self._total = estimate_total(config, len(self.train_posts))
            self._started_at = time.monotonic()
            self._set_status("running", "starting ...")
            self._set_phase("loading the model")
            self._changed("loss", "evals", "progress")
            self._run_job = Job(lambda: self._run(config, resume_from), "ccclip-finetune", tick=self._tick)
        if block:
            self.wait()
        return self

    def stop(self) -> FineTune:
        """Ask the run to end after the current step (a resumable checkpoint is saved first). Returns ``self``."""
        self._stop_event.set()
        if self.running and self._status == "running":
            self._set_status("stopping", "stopping after the current step ...")
        return self

    def _jobs(self) -> list[Job]:
        return [j for j in (self._run_job, self._embed_job) if j is not None]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run (and a re-embedding in progress) has ended.

        While a cell blocks here the notebook cannot receive button clicks (the panel says so); use
        ``await ft.wait_async()`` in notebooks to keep Stop working. Interrupting the kernel (``KeyboardInterrupt``)
        stops the run after its current step, waits for that and returns normally, with :attr:`result` set and the
        status ``"stopped"``.

        Parameters
        ----------
        timeout
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True when nothing is running any more.

        Raises
        ------
        TrainingInterruptedError
            When interrupted a second time while the run is still stopping.
        """
        with self._lock:
            self._blocking_waits += 1
        self._changed("status")
        try:
            return wait_done(self._jobs(), timeout)
        except KeyboardInterrupt:
            self._interrupted()
            try:
                if wait_done(self._jobs(), INTERRUPT_GRACE_S):
                    return True
            except KeyboardInterrupt:
                pass
            raise TrainingInterruptedError(
                f"interrupted while the run was stopping (status {self._status!r}); it ends after its current "
                "step: call ft.wait() again"
            ) from None
        finally:
            with self._lock:
                self._blocking_waits -= 1
            self._changed("status")

    def _interrupted(self) -> None:
        self.stop()
        with self._lock:
            if self._status == "stopping":
                self._message = "interrupted: stopping after the current step ..."
        self._changed("status")

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Wait for the run without blocking the notebook: ``await ft.wait_async()`` in a cell.

        The kernel keeps receiving widget messages while the cell awaits, so Stop (and other widgets' buttons)
        work. Interrupting the kernel cancels the wait; the run is then stopped after its current step, and the
        wait returns normally once it has, with :attr:`result` set and the status ``"stopped"``.

        Parameters
        ----------
        timeout
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True when nothing is running any more.
        """
        try:
            return await wait_done_async(self._jobs(), timeout)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the interrupt is handled here: the cell goes on
            self._interrupted()
            if await wait_done_async(self._jobs(), INTERRUPT_GRACE_S):
                return True
            raise TrainingInterruptedError(
                f"the run did not stop within {INTERRUPT_GRACE_S:.0f} s of the interrupt; await ft.wait_async() again"
            ) from None

    def reembed(self, posts: Posts | None = None, *, block: bool = True) -> Embeddings | None:
        """Embed ``posts`` with the fine-tuned model and hand the result to :meth:`on_reembedded` listeners.

        The model is loaded from :attr:`checkpoint` (so its fingerprint, and the stored vectors, match what
        ``ccclip eval --model CHECKPOINT`` sees); a LoRA run stopped before merging uses the in-memory model.

        Parameters
        ----------
        posts
            Posts to embed (default: :attr:`posts`).
        block
            Wait for the result; ``False`` embeds in a background thread (what the button does).

        Returns
        -------
        Embeddings or None
            The embeddings (``None`` when not blocking, or when it failed: see the error panel).
        """
        if self.result is None:
            raise RuntimeError("nothing to re-embed with yet: run the fine-tuning first")
        if self._reembedding:
            raise RuntimeError("a re-embedding is already in progress")
        target = posts if posts is not None else self.posts
        self._reembedding = True
        self._changed("reembed")
        if not block:
            self._embed_job = Job(lambda: self._reembed(target), "ccclip-reembed")
            return None
        return self._reembed(target)

    # ---------------------------------------------------------------------------------------------- error panel
    @property
    def error_html(self) -> str:
        """The error panel's HTML (empty when the last run did not fail)."""
        from ._finetune_view import error_html

        return error_html(self.error, self.error_hint, self.error_trace)

    # ---------------------------------------------------------------------------------------------- view
    @property
    def view(self) -> Any:
        """The :class:`~ccclip_widgets.widgets._finetune_view.FineTuneView` (built on first use)."""
        if self._view is None:
            from ._finetune_view import FineTuneView

            self._view = FineTuneView(self)
        return self._view

    @property
    def loss_figure(self) -> Any:
        """The live loss chart (a plotly ``FigureWidget``)."""
        return self.view.loss_figure

    @property
    def metrics_figure(self) -> Any:
        """The live Recall@k chart (a plotly ``FigureWidget`` with a legend)."""
        return self.view.metrics_figure

    def __repr__(self) -> str:
        return (
            f"FineTune(status={self._status!r}, train_posts={len(self.train_posts)}, "
            f"steps={len(self.history)}, checkpoint={self.checkpoint})"
        )
