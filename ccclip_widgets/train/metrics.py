"""In-memory retrieval metrics for evaluation during training (no store, no files).

Posts can share an image (reposts) or a text (memes, stock captions), so retrieval is scored over *unique*
images and texts: a text query is answered correctly by any image it was posted with, and an image query by any
of its texts. The rank of a query is 1 + the number of wrong candidates scoring at least as high as its best
right one (ties count against the model, so a constant model does not look good).

Groups: ``all``, each ``caption_kind`` (e.g. ``commentative``), each language as ``lang=xx``, and each
caption kind within a language as ``commentative,lang=xx``, when those columns exist. Each group is scored
within its own posts (its own candidate pool), as retrieval on a separate test set would be. Flat metric keys are
``"{direction}/{group}/{metric}"`` with direction ``image_to_text`` or ``text_to_image`` and metric ``r_at_1``,
``r_at_5``, ``r_at_10``, ``median_rank``, ``mean_rank`` or ``n_queries``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

__all__ = ["DIRECTIONS", "METRIC_NAMES", "metrics_frame", "post_groups", "retrieval_metrics"]

DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")
METRIC_NAMES: tuple[str, ...] = ("r_at_1", "r_at_5", "r_at_10", "median_rank", "mean_rank", "n_queries")


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


def _ranks(
    queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, chunk: int = 1024
) -> np.ndarray:
    """Rank of each query's best positive among candidates (1 = first). ``positives``: Q x C bool."""
    out = np.empty(queries.shape[0], dtype=np.int64)
    for s in range(0, queries.shape[0], chunk):
        scores = queries[s : s + chunk] @ candidates.T
        pos = positives[s : s + chunk]
        best = scores.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
        wrong_above = ((scores >= best) & ~pos).sum(dim=1)
        out[s : s + chunk] = (wrong_above + 1).numpy()
    return out


def _summary(ranks: np.ndarray) -> dict[str, float]:
    if ranks.size == 0:
        return {m: float("nan") for m in METRIC_NAMES[:-1]} | {"n_queries": 0.0}
    return {
        "r_at_1": float(np.mean(ranks <= 1)),
        "r_at_5": float(np.mean(ranks <= 5)),
        "r_at_10": float(np.mean(ranks <= 10)),
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(np.mean(ranks)),
        "n_queries": float(ranks.size),
    }


def retrieval_metrics(
    image_features: np.ndarray | torch.Tensor,
    text_features: np.ndarray | torch.Tensor,
    image_index: np.ndarray,
    text_index: np.ndarray,
    groups: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall and ranks, per group.

    Parameters
    ----------
    image_features
        ``I x D`` L2-normalized features of the unique images.
    text_features
        ``T x D`` L2-normalized features of the unique texts.
    image_index, text_index
        Per post: row of its image in ``image_features`` and of its text in ``text_features``.
    groups
        Group name -> boolean mask over posts (default: ``{"all": every post}``).

    Returns
    -------
    dict[str, float]
        Flat ``"{direction}/{group}/{metric}"`` keys (see the module notes).
    """
    img = torch.as_tensor(np.asarray(image_features, dtype=np.float32))
    txt = torch.as_tensor(np.asarray(text_features, dtype=np.float32))
    image_index = np.asarray(image_index, dtype=np.int64)
    text_index = np.asarray(text_index, dtype=np.int64)
    if groups is None:
        groups = {"all": np.ones(len(image_index), dtype=bool)}
    out: dict[str, float] = {}
    for name, mask in groups.items():
        ii = image_index[mask]
        ti = text_index[mask]
        imgs = np.unique(ii)
        txts = np.unique(ti)
        img_pos = {v: k for k, v in enumerate(imgs)}
        txt_pos = {v: k for k, v in enumerate(txts)}
        pairs = torch.zeros(len(imgs), len(txts), dtype=torch.bool)
        if len(ii):
            pairs[[img_pos[v] for v in ii], [txt_pos[v] for v in ti]] = True
        i_feats = img[torch.as_tensor(imgs)]
        t_feats = txt[torch.as_tensor(txts)]
        for direction, ranks in (
            ("image_to_text", _ranks(i_feats, t_feats, pairs)),
            ("text_to_image", _ranks(t_feats, i_feats, pairs.T.contiguous())),
        ):
            for metric, value in _summary(ranks).items():
                out[f"{direction}/{name}/{metric}"] = value
    return out


def metrics_frame(metrics: dict[str, float]) -> pl.DataFrame:
    """Flat metric keys as a table: one row per direction x group, one column per metric.

    Parameters
    ----------
    metrics
        Output of :func:`retrieval_metrics` (other keys are ignored).

    Returns
    -------
    polars.DataFrame
        Columns ``direction``, ``group``, ``n_queries``, ``r_at_1``, ``r_at_5``, ``r_at_10``, ``median_rank``,
        ``mean_rank``.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] not in DIRECTIONS:
            continue
        row = rows.setdefault((parts[0], parts[1]), {"direction": parts[0], "group": parts[1]})
        row[parts[2]] = value
    columns = ["direction", "group", "n_queries", "r_at_1", "r_at_5", "r_at_10", "median_rank", "mean_rank"]
    if not rows:
        return pl.DataFrame(
            schema={c: (pl.String if c in ("direction", "group") else pl.Float64) for c in columns}
        )
    frame = pl.DataFrame(list(rows.values()))
    for c in columns:
        if c not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(c))
    return frame.select(columns).with_columns(pl.col("n_queries").cast(pl.Int64))
