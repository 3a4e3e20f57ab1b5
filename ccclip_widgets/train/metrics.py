"""Retrieval metrics during training, as flat ``"{direction}/{group}/{metric}"`` numbers (no store, no files).

The ranks come from the toolkit's one retrieval engine, :func:`ccclip_widgets.evaluate.group_ranks`, so the
numbers equal :func:`~ccclip_widgets.evaluate.evaluate_retrieval` (with ``pool="all"``) on the same vectors: the
same tie rule (mid-rank: ``1 + n_better + n_tied_wrong / 2``, so a constant model sits at the middle of the
ranking), the same positives (posts sharing an image share their image key), the same candidate pool (every
evaluation post, for every group) and the same chance level.

Groups: ``all``, each ``caption_kind`` (e.g. ``commentative``), each language as ``lang=xx``, and each
caption kind within a language as ``commentative,lang=xx``, when those columns exist. Flat metric keys are
``"{direction}/{group}/{metric}"`` with direction ``image_to_text`` or ``text_to_image`` and metric ``r_at_1``,
``r_at_5``, ``r_at_10``, ``median_rank``, ``mean_rank``, ``n_queries`` or ``pool_size``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from ..evaluate import group_ranks, recall_summary

__all__ = ["DIRECTIONS", "METRIC_NAMES", "metrics_frame", "post_groups", "retrieval_metrics"]

DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")
METRIC_NAMES: tuple[str, ...] = (
    "r_at_1",
    "r_at_5",
    "r_at_10",
    "median_rank",
    "mean_rank",
    "n_queries",
    "pool_size",
)
_KS = (1, 5, 10)


def post_groups(table: pl.DataFrame) -> dict[str, np.ndarray]:
    """Row masks of the evaluation groups (see the module notes).

    Parameters
    ----------
    table
        Posts table; ``caption_kind`` and ``lang`` are used when present.

    Returns
    -------
    dict[str, numpy.ndarray]
        Group name -> boolean mask over rows, ``all`` first.
    """
    n = table.height
    groups: dict[str, np.ndarray] = {"all": np.ones(n, dtype=bool)}
    kinds = table["caption_kind"].to_list() if "caption_kind" in table.columns else None
    langs = table["lang"].to_list() if "lang" in table.columns else None
    kind_values = sorted({k for k in kinds if k}) if kinds else []
    lang_values = sorted({v for v in langs if v}) if langs else []
    for k in kind_values:
        groups[k] = np.array([v == k for v in kinds], dtype=bool)  # type: ignore[union-attr]
    for lang in lang_values:
        groups[f"lang={lang}"] = np.array([v == lang for v in langs], dtype=bool)  # type: ignore[union-attr]
    if len(lang_values) > 1 or len(kind_values) > 1:
        for k in kind_values:
            for lang in lang_values:
                mask = groups[k] & groups[f"lang={lang}"]
                if mask.any():
                    groups[f"{k},lang={lang}"] = mask
    return groups


def retrieval_metrics(
    image_features: Any,
    text_features: Any,
    image_index: np.ndarray,
    text_index: np.ndarray,
    groups: dict[str, np.ndarray] | None = None,
    *,
    pool: str = "all",
) -> dict[str, float]:
    """Image-to-text and text-to-image recall and ranks, per group.

    Parameters
    ----------
    image_features
        ``I x D`` features of the unique images (numpy or torch).
    text_features
        ``T x D`` features of the unique texts.
    image_index, text_index
        Per post: row of its image in ``image_features`` and of its text in ``text_features``.
    groups
        Group name -> boolean mask over posts (default: ``{"all": every post}``).
    pool
        ``"all"`` (every post is a candidate for every group) or ``"group"``; see
        :func:`~ccclip_widgets.evaluate.group_ranks`.

    Returns
    -------
    dict[str, float]
        Flat ``"{direction}/{group}/{metric}"`` keys (see the module notes).
    """
    image_index = np.asarray(image_index, dtype=np.int64).reshape(-1)
    text_index = np.asarray(text_index, dtype=np.int64).reshape(-1)
    if groups is None:
        groups = {"all": np.ones(len(image_index), dtype=bool)}
    # one row per post, as evaluate_retrieval sees the posts; posts sharing an image share its index as key
    img = _as_numpy(image_features)[image_index]
    txt = _as_numpy(text_features)[text_index]
    out: dict[str, float] = {}
    for (direction, name), result in group_ranks(img, txt, image_index, groups, pool=pool).items():
        for metric, value in recall_summary(result.ranks, _KS).items():
            out[f"{direction}/{name}/{metric}"] = value
        out[f"{direction}/{name}/n_queries"] = float(result.ranks.size)
        out[f"{direction}/{name}/pool_size"] = float(result.pool_size)
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def metrics_frame(metrics: dict[str, float]) -> pl.DataFrame:
    """Flat metric keys as a table: one row per direction x group, one column per metric.

    Parameters
    ----------
    metrics
        Output of :func:`retrieval_metrics` (other keys are ignored).

    Returns
    -------
    polars.DataFrame
        Columns ``direction``, ``group``, ``n_queries``, ``pool_size``, ``r_at_1``, ``r_at_5``, ``r_at_10``, ``median_rank``,
        ``mean_rank``.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] not in DIRECTIONS:
            continue
        row = rows.setdefault((parts[0], parts[1]), {"direction": parts[0], "group": parts[1]})
        row[parts[2]] = value
    columns = [
        "direction",
        "group",
        "n_queries",
        "pool_size",
        "r_at_1",
        "r_at_5",
        "r_at_10",
        "median_rank",
        "mean_rank",
    ]
    if not rows:
        return pl.DataFrame(
            schema={c: (pl.String if c in ("direction", "group") else pl.Float64) for c in columns}
        )
    frame = pl.DataFrame(list(rows.values()))
    for c in columns:
        if c not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
    return frame.select(columns).with_columns(pl.col("n_queries", "pool_size").cast(pl.Int64))
