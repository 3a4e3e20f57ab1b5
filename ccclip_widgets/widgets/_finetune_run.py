"""Pieces of a FineTune run that hold no panel state: the background job, durations, hints, live embeddings."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..posts import Posts
    from ..train import EvalInfo

__all__ = [
    "Job",
    "duration",
    "eta_seconds",
    "hint",
    "live_embeddings",
    "loss_points",
    "recall_series",
    "step_message",
    "wait_done",
    "wait_done_async",
]


class Job:
    """A daemon thread plus an event set only after the target returned (so everything it recorded is in place).

    Waiting on :attr:`done` in short slices, rather than on ``Thread.join``, keeps a ``KeyboardInterrupt`` prompt
    and harmless: an interrupted ``join`` can report a live thread as finished on Python < 3.13.
    """

    def __init__(self, target: Callable[[], None], name: str, tick: Callable[[], None] | None = None) -> None:
        self.done = threading.Event()

        def body() -> None:
            try:
                target()
            finally:
                self.done.set()

        self.thread = threading.Thread(target=body, name=name, daemon=True)
        self.thread.start()
        if tick is not None:

            def ticking() -> None:
                while not self.done.wait(1.0):
                    tick()

            threading.Thread(target=ticking, name=f"{name}-tick", daemon=True).start()


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min`` (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def hint(exc: BaseException) -> str:
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
    if isinstance(exc, ValueError):
        return "Check the training posts and the settings, then press Start again."
    return "The traceback below and the log (logger 'ccclip_widgets') show where it failed."


def live_embeddings(eval_posts: Posts, info: EvalInfo, spec: str) -> Embeddings:
    """An evaluation's scored vectors (``info.vectors``) as :class:`~ccclip_widgets.embed.Embeddings` of the posts.

    Nothing is encoded: these are the vectors the training-time evaluation computed.
    """
    import polars as pl

    from ..embed import Embeddings

    vec = info.vectors
    if vec is None:
        raise ValueError("this evaluation carries no vectors")
    posts = eval_posts
    if vec.table.height != posts.table.height:  # posts without an image were left out of the evaluation
        posts = dataclasses.replace(posts, table=vec.table)
    return Embeddings(
        posts=posts,
        image=np.asarray(vec.image, dtype=np.float32),
        text=np.asarray(vec.text, dtype=np.float32),
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


# ---------------------------------------------------------------------------------------------- run records
def eta_seconds(history: list[dict[str, Any]], total: int) -> float | None:
    """Seconds left at the pace of the last (up to 20) steps; ``None`` before two steps."""
    steps = [h for h in history[-20:] if "elapsed_s" in h]
    if len(steps) < 2 or steps[-1]["step"] <= steps[0]["step"]:
        return None
    per_step = (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (steps[-1]["step"] - steps[0]["step"])
    return max(0.0, (total - steps[-1]["step"]) * per_step)


def step_message(info: Any, eta: float | None) -> str:
    """The status line after a step: step, epoch, loss, speed and the time left."""
    left = f" \u00b7 about {duration(eta)} left" if eta is not None else ""
    return (
        f"step {info.step}/{info.total_steps} \u00b7 epoch {info.epoch + 1} \u00b7 loss {info.loss:.4f}"
        f" \u00b7 {info.samples_per_s:.0f} pairs/s{left}"
    )


def loss_points(history: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)``: one point per optimizer step."""
    xs = np.array([h["step"] for h in history], dtype=np.int32)
    ys = np.array([h["loss"] for h in history], dtype=np.float32)
    return xs, ys


def recall_series(evals: list[dict[str, Any]], curve_ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """The recall chart's lines: text-to-image Recall@k per caption kind, then the chance level.

    Parameters
    ----------
    evals
        Evaluations (``step`` and flat metrics, as in ``FineTune.eval_history``).
    curve_ks
        The k of each line.

    Returns
    -------
    list of dict
        ``name``, ``group`` (caption kind, ``all`` or ``chance``), ``k``, ``x`` (steps), ``y``. The chance line is
        ``k / pool_size`` for the largest k (every group is ranked against the same pool).
    """
    kinds = ("descriptive", "commentative")
    groups = [g for g in kinds if any(f"text_to_image/{g}/r_at_5" in e for e in evals)]
    if not groups and evals:
        groups = ["all"]
    xs = np.array([e["step"] for e in evals], dtype=np.int32)
    out: list[dict[str, Any]] = []
    for k in curve_ks:
        for g in groups:
            key = f"text_to_image/{g}/r_at_{k}"
            y = np.array([float("nan") if e.get(key) is None else e[key] for e in evals], dtype=np.float32)
            out.append({"name": f"{g} R@{k}", "group": g, "k": k, "x": xs, "y": y})
    pool = next((e.get("text_to_image/all/pool_size") for e in reversed(evals)), None)
    if pool and evals:
        k = max(curve_ks)
        y = np.full(len(xs), min(1.0, k / float(pool)), dtype=np.float32)
        out.append({"name": f"chance R@{k} (pool {int(pool)})", "group": "chance", "k": k, "x": xs, "y": y})
    return out


# ---------------------------------------------------------------------------------------------- waiting
def wait_done(jobs: list[Job], timeout: float | None) -> bool:
    """Block until every job is done (True) or ``timeout`` seconds passed (False), in 0.1 s slices."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for job in jobs:
        while not job.done.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                return False
    return True


async def wait_done_async(jobs: list[Job], timeout: float | None) -> bool:
    """:func:`wait_done` for a coroutine: sleeps on the event loop, so the kernel keeps handling messages."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while any(not j.done.is_set() for j in jobs):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)
    return True
