"""The FineTune panel: contrastive fine-tuning (C-CLIP) with live loss and recall curves, from a notebook.

:class:`FineTune` is a plain Python object around :func:`ccclip_widgets.train.fine_tune`. It holds the settings
that matter in a classroom or an analysis (epochs, batch size, learning rate, what trains), runs the training in a
background thread so the notebook stays responsive, and shows

* Start and Stop buttons (Stop ends training after the current step and keeps a resumable checkpoint);
* a progress bar and a status line fed by every optimizer step;
* live curves: the training loss per step and text-to-image Recall@k per caption kind at every evaluation;
* the checkpoint folder when training ends, and a button that re-embeds the posts with the fine-tuned model and
  hands the new :class:`~ccclip_widgets.embed.Embeddings` to whoever listens (:meth:`FineTune.on_reembedded`,
  e.g. a :class:`~ccclip_widgets.widgets.gap.Gap` through :meth:`Gap.connect`);
* an error panel: a failed run shows the exception, its message and a hint in the widget.

Every run starts from a copy of the base model, so the base stays untouched (and can be compared against) and
pressing Start twice trains twice from the same starting point.

Driving it from code, as the buttons do::

    ft = FineTune(model, train_posts, eval_posts=test_posts).configure(epochs=3, trains="lock_text")
    ft.start(block=False)   # what the Start button does
    ft.wait()               # True once the thread ended
    ft.status, ft.checkpoint, ft.history[-1]["loss"]
    emb = ft.reembed()      # what the re-embed button does
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ._common import escape, register_callback, require_plotly, require_widgets

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..posts import Posts
    from ..train import EvalInfo, FineTuneConfig, FineTuneResult, StepInfo

log = logging.getLogger(__name__)

__all__ = ["STATUSES", "TRAINS", "FineTune"]

#: Choices of the "what trains" menu: key -> label.
TRAINS: dict[str, str] = {
    "full": "everything (full fine-tune)",
    "lock_image": "lock the image tower",
    "lock_text": "lock the text tower",
    "projections": "projections only",
    "lora": "LoRA adapters",
}
#: Values of :attr:`FineTune.status`.
STATUSES: tuple[str, ...] = ("idle", "running", "stopping", "finished", "stopped", "failed")
_SETTINGS = ("epochs", "max_steps", "batch_size", "lr", "trains", "unlock_blocks", "eval_every_steps")
_STATUS_COLORS = {
    "idle": "#555",
    "running": "#1f6feb",
    "stopping": "#b07d00",
    "finished": "#1a7f37",
    "stopped": "#b07d00",
    "failed": "#b00020",
}


def _default_config() -> FineTuneConfig:
    from ..train import FineTuneConfig

    # The engine's defaults, minus its console progress bar (this panel has its own).
    return FineTuneConfig(show_progress=False)


class FineTune:
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
        Posts that the re-embed button embeds with the fine-tuned model (default: ``eval_posts``, else
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
        Recall@k values drawn in the metrics plot.

    Attributes
    ----------
    result
        The :class:`~ccclip_widgets.train.FineTuneResult` of the last run that ended (``None`` before).
    error
        The exception of the last failed run (``None`` otherwise).
    embeddings
        The :class:`~ccclip_widgets.embed.Embeddings` of the last re-embedding.
    tuned_model
        The fine-tuned :class:`~ccclip_widgets.models.ClipModel` used by the last re-embedding.
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
        self.base_config = config if config is not None else _default_config()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.store = store
        self.device = device
        self.allow_random = allow_random
        self.curve_ks = tuple(int(k) for k in curve_ks)
        self._settings = _settings_from_config(self.base_config)
        self._lr_touched = self.base_config.lr is not None

        self._lock = threading.RLock()
        self._status = "idle"
        self._message = "Press Start to fine-tune."
        self._thread: threading.Thread | None = None
        self._embed_thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._training: ClipModel | None = None
        self._run_dir: Path | None = None
        self._total = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.result: FineTuneResult | None = None
        self.error: BaseException | None = None
        self.error_hint = ""
        self._error_trace = ""
        self.embeddings: Embeddings | None = None
        self.tuned_model: ClipModel | None = None
        self._callbacks: dict[str, list[Callable[..., Any]]] = {
            "step": [],
            "eval": [],
            "finished": [],
            "reembedded": [],
            "live_embeddings": [],
        }
        self._last_draw = 0.0
        self._drawn_steps = 0
        self._drawn_evals = 0
        # widgets, built on first use
        self._widget: Any = None
        self._w: dict[str, Any] = {}
        self._loss_fig: Any = None
        self._metric_fig: Any = None
        self._syncing = False

    # ---------------------------------------------------------------------------------------------- settings
    def configure(self, **settings: Any) -> FineTune:
        """Change the settings the controls show.

        Parameters
        ----------
        **settings
            Any of ``epochs`` (int), ``max_steps`` (int; 0 or None: run ``epochs``), ``batch_size`` (int),
            ``lr`` (float, or None for the engine's default for what trains), ``trains`` (one of
            :data:`TRAINS`: ``"full"``, ``"lock_image"``, ``"lock_text"``, ``"projections"``, ``"lora"``),
            ``unlock_blocks`` (int: with a locked tower, train its last N blocks), ``eval_every_steps`` (int;
            0: at each epoch end).

        Returns
        -------
        FineTune
            ``self``, for chaining.
        """
        unknown = set(settings) - set(_SETTINGS)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {list(_SETTINGS)}")
        if "trains" in settings and settings["trains"] not in TRAINS:
            raise ValueError(f"trains must be one of {list(TRAINS)}, got {settings['trains']!r}")
        with self._lock:
            if "lr" in settings:
                self._lr_touched = settings["lr"] is not None
            self._settings.update(settings)
            if settings.get("max_steps") == 0:
                self._settings["max_steps"] = None
        self._sync_controls()
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The current settings (see :meth:`configure`)."""
        with self._lock:
            return dict(self._settings)

    @property
    def config(self) -> FineTuneConfig:
        """The :class:`~ccclip_widgets.train.FineTuneConfig` that Start would use (validated; may raise)."""
        from ..train import LoraSettings

        s = self.settings
        base = self.base_config
        trains = s["trains"]
        unlock = int(s["unlock_blocks"] or 0)
        changes: dict[str, Any] = {
            "epochs": int(s["epochs"]),
            "max_steps": int(s["max_steps"]) if s["max_steps"] else None,
            "batch_size": int(s["batch_size"]),
            "lr": float(s["lr"]) if (s["lr"] is not None and self._lr_touched) else base.lr,
            "eval_every_steps": int(s["eval_every_steps"] or 0),
            "lock_image": trains == "lock_image",
            "lock_text": trains == "lock_text",
            "unlock_last_image_blocks": unlock if trains == "lock_image" else 0,
            "unlock_last_text_blocks": unlock if trains == "lock_text" else 0,
            "train_projections_only": trains == "projections",
            "lora": (base.lora or LoraSettings()) if trains == "lora" else None,
        }
        return dataclasses.replace(base, **changes)

    # ---------------------------------------------------------------------------------------------- callbacks
    def _register(self, event: str, callback: Callable[..., Any], remove: bool) -> FineTune:
        with self._lock:
            register_callback(self._callbacks[event], callback, remove)
        return self

    def on_step(self, callback: Callable[[StepInfo], Any], remove: bool = False) -> FineTune:
        """Call ``callback(step_info)`` after every optimizer step (from the training thread).

        Returns
        -------
        FineTune
            ``self``.
        """
        return self._register("step", callback, remove)

    def on_eval(self, callback: Callable[[EvalInfo], Any], remove: bool = False) -> FineTune:
        """Call ``callback(eval_info)`` after every evaluation on ``eval_posts`` (from the training thread).

        Returns
        -------
        FineTune
            ``self``.
        """
        return self._register("eval", callback, remove)

    def on_finished(self, callback: Callable[[FineTuneResult], Any], remove: bool = False) -> FineTune:
        """Call ``callback(result)`` when a run ends without error (finished, early-stopped or stopped).

        Returns
        -------
        FineTune
            ``self``.
        """
        return self._register("finished", callback, remove)

    def on_reembedded(
        self, callback: Callable[[Embeddings, ClipModel], Any], remove: bool = False
    ) -> FineTune:
        """Call ``callback(embeddings, model)`` when the posts have been re-embedded with the fine-tuned model.

        Returns
        -------
        FineTune
            ``self``.
        """
        return self._register("reembedded", callback, remove)

    def on_live_embeddings(
        self, callback: Callable[[Embeddings, EvalInfo], Any], remove: bool = False
    ) -> FineTune:
        """Call ``callback(embeddings, eval_info)`` at every evaluation with ``eval_posts`` embedded by the model
        being trained (computed only while someone listens; used by :meth:`Gap.connect`).

        Returns
        -------
        FineTune
            ``self``.
        """
        return self._register("live_embeddings", callback, remove)

    def connect(self, view: Any, name: str = "fine-tuned", **kwargs: Any) -> FineTune:
        """Let ``view`` follow this panel (anything with ``connect(finetune, name)``, e.g. a Gap view).

        For other objects, such as an Explorer, register :meth:`on_reembedded` yourself.

        Returns
        -------
        FineTune
            ``self``.
        """
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

    # ---------------------------------------------------------------------------------------------- state
    @property
    def status(self) -> str:
        """One of :data:`STATUSES`: ``idle``, ``running``, ``stopping``, ``finished``, ``stopped``, ``failed``."""
        return self._status

    @property
    def running(self) -> bool:
        """True while a training thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

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
        """Planned steps of the current or last run (0 before the first step)."""
        return self._total

    # ---------------------------------------------------------------------------------------------- actions
    def start(self, block: bool = False, *, resume: bool = False) -> FineTune:
        """Start a training run in a background thread (what the Start button does).

        Parameters
        ----------
        block
            Wait until the run ends.
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
            self._total = _estimate_total(config, len(self.train_posts))
            self._set_status("running", f"starting: {len(self.train_posts)} training posts ...")
            self._reset_plots()
            self._thread = threading.Thread(
                target=self._run, args=(config, resume_from), name="ccclip-finetune", daemon=True
            )
            self._thread.start()
        if block:
            self.wait()
        return self

    def stop(self) -> FineTune:
        """Ask the run to end after the current step (a resumable checkpoint is saved first).

        Returns
        -------
        FineTune
            ``self``.
        """
        self._stop_event.set()
        if self.running:
            self._set_status("stopping", "stopping after the current step ...")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the training thread (and a re-embedding in progress) to end.

        Parameters
        ----------
        timeout
            Seconds to wait at most (None: no limit).

        Returns
        -------
        bool
            True when nothing is running any more.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (self._thread, self._embed_thread):
            if t is None:
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                return False
        return True

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
        if self._embed_thread is not None and self._embed_thread.is_alive():
            raise RuntimeError("a re-embedding is already in progress")
        target = posts if posts is not None else self.posts
        if not block:
            self._embed_thread = threading.Thread(
                target=self._reembed, args=(target,), name="ccclip-reembed", daemon=True
            )
            self._embed_thread.start()
            return None
        return self._reembed(target)

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
            self._draw(force=True)
            return
        finally:
            self._training = None
        self.result = result
        status = "stopped" if result.stopped == "user" else "finished"
        loss = next((h["loss"] for h in reversed(result.history) if not h.get("skipped")), float("nan"))
        how = {"early_stopping": " (early stopping)", "user": " by Stop"}.get(result.stopped, "")
        self._set_status(
            status,
            f"{status}{how}: {result.steps}/{result.total_steps} steps in {result.elapsed_s:.1f} s, "
            f"final loss {loss:.4f}",
        )
        self._draw(force=True)
        self._show_checkpoint()
        self._fire("finished", result)

    def _on_step(self, info: StepInfo) -> None:
        d = dataclasses.asdict(info)
        with self._lock:
            self.history.append(d)
            self._total = info.total_steps
        if self._status == "running":
            self._message = (
                f"step {info.step}/{info.total_steps} \u00b7 epoch {info.epoch + 1} \u00b7 loss {info.loss:.4f}"
                f" \u00b7 lr {info.lr:.2e} \u00b7 {info.samples_per_s:.0f} pairs/s"
            )
        self._draw()
        self._fire("step", info)

    def _on_eval(self, info: EvalInfo) -> None:
        with self._lock:
            self.eval_history.append({"step": info.step, "epoch": info.epoch, **info.metrics})
        self._draw(force=True)
        self._fire("eval", info)
        with self._lock:
            live = bool(self._callbacks["live_embeddings"])
        if live and self._training is not None and self.eval_posts is not None:
            try:
                emb = self._live_embeddings(self._training, info)
            except Exception:  # a live preview must never stop the training
                log.warning("could not embed the eval posts with the model being trained", exc_info=True)
                return
            self._fire("live_embeddings", emb, info)

    def _live_embeddings(self, clip: ClipModel, info: EvalInfo) -> Embeddings:
        """The eval posts embedded by the model being trained, in memory (called between two steps)."""
        from ..embed import Embeddings, encode_images, encode_texts
        from ..train.freeze import freeze_locked_batchnorm

        assert self.eval_posts is not None
        table = self.eval_posts.table
        model = clip.model
        was_training = model.training
        model.eval()
        try:
            imgs = table.unique("image_key", keep="first", maintain_order=True)
            sources = [
                p if p is not None else b
                for p, b in zip(imgs["image_path"].to_list(), imgs["image_bytes"].to_list(), strict=True)
            ]
            ivecs = encode_images(clip, sources, batch_size=self.base_config.eval_batch_size)
            txts = table.unique("text_key", keep="first", maintain_order=True)
            tvecs = encode_texts(clip, txts["text"].to_list(), batch_size=self.base_config.eval_batch_size)
        finally:
            model.train(was_training)
            if was_training:
                freeze_locked_batchnorm(model)
        ipos = {k: i for i, k in enumerate(imgs["image_key"].to_list())}
        tpos = {k: i for i, k in enumerate(txts["text_key"].to_list())}
        image = ivecs[np.fromiter((ipos[k] for k in table["image_key"].to_list()), np.int64, table.height)]
        text = tvecs[np.fromiter((tpos[k] for k in table["text_key"].to_list()), np.int64, table.height)]
        spec = clip.spec
        return Embeddings(
            posts=self.eval_posts,
            image=image,
            text=text,
            model_fingerprint=f"training:{info.step}",
            model_spec=f"{spec} (fine-tuning, step {info.step})",
            rejects=pl.DataFrame(
                schema={
                    "post_id": pl.String,
                    "row": pl.Int64,
                    "column": pl.String,
                    "reason": pl.String,
                    "detail": pl.String,
                }
            ),
            stats={"live": True, "step": info.step, "epoch": info.epoch},
        )

    def _reembed(self, posts: Posts) -> Embeddings | None:
        from ..embed import embed_posts
        from ..models import CHECKPOINT_META, load_model

        result = self.result
        assert result is not None
        self._set_reembed_busy(True)
        self._message = f"re-embedding {len(posts)} posts with the fine-tuned model ..."
        self._render_status()
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
            self._fail(exc, keep_status=True)
            self._set_reembed_busy(False)
            return None
        self.embeddings, self.tuned_model = emb, model
        self._message = (
            f"re-embedded {len(emb)} posts with {model.spec} (fingerprint {model.fingerprint[:12]})"
        )
        self._render_status()
        self._set_reembed_busy(False)
        self._fire("reembedded", emb, model)
        return emb

    # ---------------------------------------------------------------------------------------------- errors
    def _fail(self, exc: BaseException, keep_status: bool = False) -> None:
        self.error = exc
        self.error_hint = _hint(exc)
        self._error_trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if not keep_status:
            self._set_status("failed", f"failed: {type(exc).__name__}")
        self._render_error()

    def _clear_error(self) -> None:
        self.error = None
        self.error_hint = ""
        self._error_trace = ""
        self._render_error()

    @property
    def error_html(self) -> str:
        """The error panel's HTML (empty when the last run did not fail)."""
        exc = self.error
        if exc is None:
            return ""
        return (
            '<div style="border:1px solid #b00020;background:#fff5f5;padding:8px;border-radius:4px">'
            f'<div><b style="color:#b00020">{escape(type(exc).__name__)}</b>: '
            f'<span class="ccclip-ft-error-message">{escape(exc)}</span></div>'
            f'<div class="ccclip-ft-error-hint" style="margin-top:4px">Hint: {escape(self.error_hint)}</div>'
            f'<details style="margin-top:4px"><summary>traceback</summary>'
            f'<pre style="font-size:11px;white-space:pre-wrap">{escape(self._error_trace)}</pre></details></div>'
        )

    # ---------------------------------------------------------------------------------------------- rendering
    def _set_status(self, status: str, message: str) -> None:
        self._status = status
        self._message = message
        self._render_status()
        w = self._w
        if w:
            running = status in ("running", "stopping")
            w["start"].disabled = running
            w["stop"].disabled = not running
            w["reembed"].disabled = running or self.result is None
            for key in _SETTINGS:
                w[key].disabled = running
            if not running:
                self._update_unlock_enabled()

    def _render_status(self) -> None:
        w = self._w.get("status")
        if w is None:
            return
        color = _STATUS_COLORS.get(self._status, "#555")
        w.value = (
            f'<span data-status="{escape(self._status)}" style="color:{color};font-weight:bold">'
            f"{escape(self._status)}</span> <span>{escape(self._message)}</span>"
        )

    def _render_error(self) -> None:
        w = self._w.get("error")
        if w is None:
            return
        w.value = self.error_html
        w.layout.display = "block" if self.error is not None else "none"

    def _show_checkpoint(self) -> None:
        w = self._w.get("checkpoint")
        if w is None:
            return
        ck = self.checkpoint
        w.value = (
            f'Checkpoint: <code class="ccclip-ft-checkpoint-path">{escape(ck)}</code> '
            '<span style="color:#555">(load it with load_model(path), or ccclip eval --model path)</span>'
            if ck is not None
            else ""
        )
        if self.result is not None and self.status in ("finished", "stopped"):
            self._w["reembed"].disabled = False

    def _set_reembed_busy(self, busy: bool) -> None:
        w = self._w.get("reembed")
        if w is not None:
            w.disabled = busy
            w.description = "Re-embedding ..." if busy else "Re-embed posts with the new model"

    def _reset_plots(self) -> None:
        self._drawn_steps = 0
        self._drawn_evals = 0
        self._last_draw = 0.0
        if self._loss_fig is not None:
            with self._loss_fig.batch_update():
                self._loss_fig.data[0].x = []
                self._loss_fig.data[0].y = []
        if self._metric_fig is not None:
            self._metric_fig.data = []
        w = self._w.get("progress")
        if w is not None:
            w.max = max(1, self._total)
            w.value = 0
        w = self._w.get("checkpoint")
        if w is not None:
            w.value = ""

    def _draw(self, force: bool = False) -> None:
        """Push new steps and evaluations to the plots and the progress bar (at most ~4 times a second)."""
        now = time.monotonic()
        if not force and now - self._last_draw < 0.25:
            return
        self._last_draw = now
        self._render_status()
        with self._lock:
            steps = list(self.history)
            evals = list(self.eval_history)
        w = self._w.get("progress")
        if w is not None:
            w.max = max(1, self._total)
            w.value = min(w.max, steps[-1]["step"] if steps else 0)
            w.description = f"{steps[-1]['step'] if steps else 0}/{self._total}"
        if self._loss_fig is not None and len(steps) != self._drawn_steps:
            xs = np.array([h["step"] for h in steps], dtype=np.int32)
            ys = np.array([h["loss"] for h in steps], dtype=np.float32)
            with self._loss_fig.batch_update():
                self._loss_fig.data[0].x = xs
                self._loss_fig.data[0].y = ys
            self._drawn_steps = len(steps)
        if self._metric_fig is not None and len(evals) != self._drawn_evals:
            self._draw_metrics(evals)
            self._drawn_evals = len(evals)

    def _metric_series(self, evals: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        groups = [
            g for g in ("descriptive", "commentative") if any(f"text_to_image/{g}/r_at_5" in e for e in evals)
        ]
        if not groups:
            groups = ["all"]
        return [(f"{g} R@{k}", f"text_to_image/{g}/r_at_{k}", k) for k in self.curve_ks for g in groups]

    def _draw_metrics(self, evals: list[dict[str, Any]]) -> None:
        fig = self._metric_fig
        series = self._metric_series(evals)
        xs = np.array([e["step"] for e in evals], dtype=np.int32)
        ys = [np.array([_nan(e.get(key)) for e in evals], dtype=np.float32) for _, key, _ in series]
        names = [s[0] for s in series]
        if [t.name for t in fig.data] == names:
            with fig.batch_update():
                for trace, y in zip(fig.data, ys, strict=True):
                    trace.x, trace.y = xs, y
            return
        go = require_plotly()
        colors = {"descriptive": "#4C78A8", "commentative": "#F58518", "all": "#54A24B"}
        dashes = ["solid", "dot", "dash", "dashdot"]
        traces = []
        for (name, _, k), y in zip(series, ys, strict=True):
            group = name.split(" ")[0]
            dash = dashes[self.curve_ks.index(k) % len(dashes)]
            traces.append(
                go.Scatter(
                    x=xs,
                    y=y,
                    name=name,
                    mode="lines+markers",
                    line={"color": colors.get(group), "dash": dash},
                )
            )
        with fig.batch_update():
            fig.data = []
        fig.add_traces(traces)

    def _update_unlock_enabled(self) -> None:
        w = self._w
        if w:
            w["unlock_blocks"].disabled = w["trains"].value not in ("lock_image", "lock_text") or self.running

    def _sync_controls(self) -> None:
        w = self._w
        if not w:
            return
        self._syncing = True
        try:
            s = self.settings
            w["epochs"].value = int(s["epochs"])
            w["max_steps"].value = int(s["max_steps"] or 0)
            w["batch_size"].value = int(s["batch_size"])
            w["lr"].value = float(self._shown_lr())
            w["trains"].value = s["trains"]
            w["unlock_blocks"].value = int(s["unlock_blocks"] or 0)
            w["eval_every_steps"].value = int(s["eval_every_steps"] or 0)
            self._update_unlock_enabled()
        finally:
            self._syncing = False

    def _shown_lr(self) -> float:
        if self._lr_touched and self._settings["lr"] is not None:
            return float(self._settings["lr"])
        try:
            return self.config.resolved_lr
        except (ValueError, TypeError):
            return self.base_config.resolved_lr

    @property
    def loss_figure(self) -> Any:
        """The live loss plot (a plotly ``FigureWidget``; one point per optimizer step)."""
        if self._loss_fig is None:
            go = require_plotly()
            fig = go.FigureWidget()
            fig.add_scatter(x=[], y=[], mode="lines", name="loss", line={"color": "#333"})
            fig.update_layout(
                title={"text": "training loss"},
                height=260,
                margin={"l": 50, "r": 10, "t": 40, "b": 35},
                xaxis={"title": {"text": "step"}},
                yaxis={"title": {"text": "contrastive loss"}},
                template="plotly_white",
                showlegend=False,
            )
            fig.add_class("ccclip-ft-loss")
            self._loss_fig = fig
            self._drawn_steps = 0
            self._draw(force=True)
        return self._loss_fig

    @property
    def metrics_figure(self) -> Any:
        """The live Recall@k plot (text to image, per caption kind, one point per evaluation)."""
        if self._metric_fig is None:
            go = require_plotly()
            fig = go.FigureWidget()
            note = "" if self.eval_posts is not None else " (give eval_posts to see it)"
            fig.update_layout(
                title={"text": f"held-out text \u2192 image recall{note}"},
                height=260,
                margin={"l": 50, "r": 10, "t": 40, "b": 35},
                xaxis={"title": {"text": "step"}},
                yaxis={"title": {"text": "Recall@k"}, "range": [0, 1.02]},
                template="plotly_white",
            )
            fig.add_class("ccclip-ft-metrics")
            self._metric_fig = fig
            self._drawn_evals = 0
            self._draw(force=True)
        return self._metric_fig

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first access)."""
        if self._widget is None:
            self._build()
        return self._widget

    def _build(self) -> None:
        widgets = require_widgets()
        s = self.settings
        style = {"description_width": "150px"}
        wide = {"width": "330px"}
        w: dict[str, Any] = {}
        w["epochs"] = widgets.BoundedIntText(
            value=int(s["epochs"]), min=1, max=10_000, description="epochs", style=style, layout=wide
        )
        w["max_steps"] = widgets.BoundedIntText(
            value=int(s["max_steps"] or 0),
            min=0,
            max=10_000_000,
            description="max steps (0: epochs)",
            style=style,
            layout=wide,
        )
        w["batch_size"] = widgets.BoundedIntText(
            value=int(s["batch_size"]), min=2, max=65_536, description="batch size", style=style, layout=wide
        )
        w["lr"] = widgets.FloatLogSlider(
            value=self._shown_lr(),
            base=10,
            min=-7,
            max=-1,
            step=0.05,
            description="learning rate",
            readout_format=".1e",
            style=style,
            layout={"width": "420px"},
        )
        w["trains"] = widgets.Dropdown(
            options=[(label, key) for key, label in TRAINS.items()],
            value=s["trains"],
            description="what trains",
            style=style,
            layout=wide,
        )
        w["unlock_blocks"] = widgets.BoundedIntText(
            value=int(s["unlock_blocks"] or 0),
            min=0,
            max=256,
            description="unlock last N blocks",
            style=style,
            layout=wide,
        )
        w["eval_every_steps"] = widgets.BoundedIntText(
            value=int(s["eval_every_steps"] or 0),
            min=0,
            max=10_000_000,
            description="evaluate every (0: epoch)",
            style=style,
            layout=wide,
        )
        w["start"] = widgets.Button(description="Start", icon="play", button_style="success")
        w["start"].add_class("ccclip-ft-start")
        w["stop"] = widgets.Button(description="Stop", icon="stop", button_style="warning", disabled=True)
        w["stop"].add_class("ccclip-ft-stop")
        w["progress"] = widgets.IntProgress(value=0, min=0, max=max(1, self._total), description="0/0")
        w["progress"].add_class("ccclip-ft-progress")
        w["status"] = widgets.HTML()
        w["status"].add_class("ccclip-ft-status")
        w["error"] = widgets.HTML(layout={"display": "none"})
        w["error"].add_class("ccclip-ft-error")
        w["checkpoint"] = widgets.HTML()
        w["checkpoint"].add_class("ccclip-ft-checkpoint")
        w["reembed"] = widgets.Button(
            description="Re-embed posts with the new model",
            icon="refresh",
            disabled=True,
            layout={"width": "300px"},
        )
        w["reembed"].add_class("ccclip-ft-reembed")
        self._w = w

        def on_setting(key: str) -> Callable[[Any], None]:
            def handler(change: Any) -> None:
                if self._syncing:
                    return
                value = change["new"]
                if key == "lr":
                    self._lr_touched = True
                with self._lock:
                    self._settings[key] = None if (key == "max_steps" and not value) else value
                if key == "trains":
                    self._update_unlock_enabled()
                    if not self._lr_touched:
                        self._syncing = True
                        try:
                            w["lr"].value = self._shown_lr()
                        finally:
                            self._syncing = False

            return handler

        for key in _SETTINGS:
            w[key].observe(on_setting(key), names="value")

        def on_start(_: Any) -> None:
            try:
                self.start(block=False)
            except Exception as exc:  # shown in the panel
                self._fail(exc)

        def on_reembed(_: Any) -> None:
            try:
                self.reembed(block=False)
            except Exception as exc:  # shown in the panel
                self._fail(exc, keep_status=True)

        w["start"].on_click(on_start)
        w["stop"].on_click(lambda _: self.stop())
        w["reembed"].on_click(on_reembed)

        settings_box = widgets.VBox(
            [
                widgets.HTML("<b>Fine-tuning settings</b>"),
                w["epochs"],
                w["max_steps"],
                w["batch_size"],
                w["lr"],
                w["trains"],
                w["unlock_blocks"],
                w["eval_every_steps"],
            ]
        )
        info = widgets.HTML(
            f'<div style="color:#555">{len(self.train_posts)} training posts; '
            f"{len(self.eval_posts) if self.eval_posts is not None else 'no'} evaluation posts</div>"
        )
        buttons = widgets.HBox([w["start"], w["stop"], w["progress"]])
        plots = widgets.HBox([self.loss_figure, self.metrics_figure])
        box = widgets.VBox(
            [settings_box, info, buttons, w["status"], w["error"], plots, w["checkpoint"], w["reembed"]]
        )
        box.add_class("ccclip-ft")
        self._widget = box
        self._update_unlock_enabled()
        self._set_status(self._status, self._message)
        self._render_error()
        self._show_checkpoint()
        self._draw(force=True)

    def show(self) -> Any:
        """Display the widget (in Jupyter) and return it."""
        from IPython.display import display

        display(self.widget)
        return self.widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (
            f"FineTune(status={self._status!r}, train_posts={len(self.train_posts)}, "
            f"steps={len(self.history)}, checkpoint={self.checkpoint})"
        )


# ---------------------------------------------------------------------------------------------------- helpers
def _nan(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _settings_from_config(cfg: FineTuneConfig) -> dict[str, Any]:
    if cfg.lora is not None:
        trains, unlock = "lora", 0
    elif cfg.train_projections_only:
        trains, unlock = "projections", 0
    elif cfg.lock_image and not cfg.lock_text:
        trains, unlock = "lock_image", cfg.unlock_last_image_blocks
    elif cfg.lock_text and not cfg.lock_image:
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


def _estimate_total(cfg: FineTuneConfig, n: int) -> int:
    """Steps the engine will plan (it reports the exact number with the first step)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    batch = max(2, min(cfg.batch_size, n))
    return cfg.epochs * max(1, math.ceil((n // batch) / cfg.grad_accum_steps))


def _hint(exc: BaseException) -> str:
    """What to try after ``exc``, in one sentence."""
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "TrainingOutOfMemoryError" or "out of memory" in text:
        return "Lower the batch size, lock a tower or choose LoRA adapters, then press Start again."
    if name == "TrainingDivergedError":
        return "Lower the learning rate (for example ten times) and press Start again."
    if isinstance(exc, ValueError) and "finetuneconfig" in text:
        return "Change the settings above as the message says and press Start again."
    if isinstance(exc, FileNotFoundError) or name == "ImageDecodeError":
        return "Check the posts' image files (read_posts reports missing or broken images) and try again."
    if name in ("ModelLoadError", "ModelUnavailableError"):
        return "Check the model spec; load_model('demo') works offline."
    if isinstance(exc, KeyboardInterrupt):
        return "The run was interrupted; press Start to run again."
    if isinstance(exc, ValueError):
        return "Check the training posts and the settings, then press Start again."
    return "The traceback below and the log (logger 'ccclip_widgets') show where it failed."
