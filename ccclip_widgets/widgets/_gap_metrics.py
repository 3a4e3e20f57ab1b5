"""The numbers behind the Gap view: each model's evaluation, the chart's table and the chart as plain data.

A mixin of :class:`~ccclip_widgets.widgets.gap.Gap`, plus what it shares with it: the models held
(:class:`ModelEntry`), their colors and the direction labels. Every number comes from
:func:`ccclip_widgets.evaluate.evaluate_retrieval` (the toolkit's one metrics engine), once per model version,
grouping and bootstrap setting (cached); :meth:`GapResults.chart_spec` turns the evaluation into bars, intervals
and the chance level for the view to draw. No widget library here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..models import ClipModel

__all__ = ["DIRECTION_LABELS", "KS", "MODEL_COLORS", "GapResults", "ModelEntry"]

#: Bar colors of the models, in the order they were added (before, after, ...).
MODEL_COLORS: tuple[str, ...] = ("#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2")
#: Human labels of the evaluation directions.
DIRECTION_LABELS: dict[str, str] = {
    "text_to_image": "text \u2192 image",
    "image_to_text": "image \u2192 text",
}
KS = (1, 5, 10)


@dataclass
class ModelEntry:
    """One model in the view: its vectors (aligned with ``table``), optionally the model and a version tag."""

    name: str
    image: np.ndarray
    text: np.ndarray
    table: pl.DataFrame
    model: ClipModel | None
    version: int
    note: str = ""


class GapResults:
    """Mixin: needs ``_lock``, ``_entries``, ``_cache``, the settings (``_k``, ``_direction``, ``_split``,
    ``_pool``, ``_n_boot``, ``_seed``) and ``selected``, ``group_by``, ``chart_by`` from :class:`Gap`."""

    _lock: threading.RLock
    _entries: dict[str, ModelEntry]
    _cache: dict[tuple[Any, ...], pl.DataFrame]
    _k: int
    _direction: str
    _split: str | None
    _pool: str
    _n_boot: int
    _seed: int
    selected: list[str]
    group_by: tuple[str, ...]
    chart_by: tuple[str, ...]

    def _evaluate(self, entry: ModelEntry, group_by: tuple[str, ...]) -> pl.DataFrame:
        from ..evaluate import evaluate_retrieval

        gcols = tuple(c for c in group_by if c in entry.table.columns)
        key = (entry.name, entry.version, gcols, self._pool, self._n_boot, self._seed)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        df = evaluate_retrieval(
            {entry.name: (entry.image, entry.text)},
            entry.table,
            group_by=gcols,
            ks=KS,
            n_boot=self._n_boot,
            seed=self._seed,
            pool=self._pool,  # type: ignore[arg-type]
        )
        with self._lock:
            # keep only the newest version of each model
            for old in [k for k in self._cache if k[0] == entry.name and k[1] != entry.version]:
                del self._cache[old]
            self._cache[key] = df
        return df

    def _combined(self, group_by: tuple[str, ...]) -> pl.DataFrame:
        with self._lock:
            entries = [self._entries[n] for n in self.selected]
        frames = [self._evaluate(e, group_by) for e in entries]
        if not frames:
            return pl.DataFrame(schema={"model": pl.String, "direction": pl.String})
        return pl.concat(frames, how="diagonal_relaxed")

    @property
    def table(self) -> pl.DataFrame:
        """The evaluation shown: :func:`~ccclip_widgets.evaluate.evaluate_retrieval` of every shown model.

        One :func:`evaluate_retrieval` call per model (its vectors and posts, grouped by :attr:`group_by`, both
        directions, R@1/5/10 with bootstrap intervals), concatenated in model order.
        """
        return self._combined(self.group_by)

    @property
    def chart_table(self) -> pl.DataFrame:
        """The numbers behind the chart: evaluation by :attr:`chart_by`, for the shown direction.

        Group values are strings (``"unlabeled"`` for missing ones); without any grouping column the one group is
        ``caption_kind = "all posts"``.
        """
        by = self.chart_by
        df = self._combined(by)
        if df.height == 0:
            return df
        df = df.filter(pl.col("direction") == self._direction)
        if not by:
            return df.with_columns(pl.lit("all posts").alias("caption_kind"))
        return df.with_columns(pl.col(c).cast(pl.String).fill_null("unlabeled") for c in by)

    def chart_spec(self) -> dict[str, Any]:
        """What the chart shows, as plain data (the view turns it into plotly traces).

        Returns
        -------
        dict
            ``title``, ``y_title``, ``groups`` (the bar groups: one tuple of values of :attr:`chart_by` each, outer
            first), ``bars`` (one per model: ``name``, ``color``, ``y``, ``lo``, ``hi``, ``n``, ``pool`` aligned with
            ``groups``; NaN where a model has no such group) and ``chance`` (the Recall@k of a random ranking, one
            per group; equal everywhere when every group is ranked against the same pool).
        """
        df = self.chart_table
        k = self._k
        by = self.chart_by or ("caption_kind",)
        models = self.selected
        rows = (
            {(r["model"], tuple(r[c] for c in by)): r for r in df.iter_rows(named=True)} if df.height else {}
        )
        groups = sorted({key for _, key in rows}, key=lambda g: _group_order(g, by))
        bars = []
        with self._lock:
            order = list(self._entries)
        for m in models:
            got = [rows.get((m, g)) for g in groups]
            if not any(got):
                continue
            bars.append(
                {
                    "name": m,
                    "color": MODEL_COLORS[order.index(m) % len(MODEL_COLORS)],
                    "y": [_num(r[f"r_at_{k}"]) if r else float("nan") for r in got],
                    "lo": [_num(r[f"r_at_{k}_lo"]) if r else float("nan") for r in got],
                    "hi": [_num(r[f"r_at_{k}_hi"]) if r else float("nan") for r in got],
                    "n": [int(r["n_queries"]) if r else 0 for r in got],
                    "pool": [int(r["pool_size"]) if r else 0 for r in got],
                }
            )
        pools = [next((int(rows[(m, g)]["pool_size"]) for m in models if (m, g) in rows), 0) for g in groups]
        title = f"{DIRECTION_LABELS[self._direction]} retrieval: R@{k} with 95% CI"
        if self._split:
            title += f" ({self._split} posts)"
        return {
            "title": title,
            "y_title": f"R@{k}",
            "by": by,
            "groups": groups,
            "bars": bars,
            "chance": [min(1.0, k / p) if p else float("nan") for p in pools],
            "k": k,
        }


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _group_order(group: tuple[str, ...], by: tuple[str, ...]) -> tuple[Any, ...]:
    """Sort key of a bar group: descriptive before commentative, English first, then alphabetical."""
    first = {"caption_kind": ("descriptive", "commentative"), "lang": ("en",)}
    key: list[Any] = []
    for col, value in zip(by, group, strict=True):
        pref = first.get(col, ())
        key += [pref.index(value) if value in pref else len(pref), value]
    return tuple(key)
