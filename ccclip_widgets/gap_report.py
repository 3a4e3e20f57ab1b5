"""The descriptive-commentative gap before and after fine-tuning: verdicts per language and a gallery.

Works on per-query ranks (text-to-image, every caption searching one shared pool of images, ties at mid-rank as
:func:`~ccclip_widgets.evaluate.retrieval_ranks` counts them), so the intervals of a *change* are paired: each
bootstrap resample draws the same queries for both models.

The gap of a language is the English descriptive R@k minus that language's commentative R@k (descriptive
captions exist in English only: the alt-text stock CLIP learned from). A verdict line says whether the
commentative recall rose with an interval that excludes zero, and how much of the gap closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from .evaluate import retrieval_ranks

__all__ = ["format_verdicts", "gap_gallery", "gap_verdicts", "text_to_image_ranks"]


def text_to_image_ranks(image_vecs: Any, text_vecs: Any, posts: pl.DataFrame) -> np.ndarray:
    """Rank of each post's own image when its text searches all distinct images of ``posts``.

    Parameters
    ----------
    image_vecs, text_vecs
        ``N x D`` vectors aligned with the rows of ``posts``.
    posts
        With ``image_key`` (posts sharing an image share a key).

    Returns
    -------
    numpy.ndarray
        ``N`` ranks (1 = found first).
    """
    keys = posts["image_key"].cast(pl.String).to_numpy()
    uniq, first, codes = np.unique(keys, return_index=True, return_inverse=True)
    images = np.asarray(image_vecs)[first]
    return retrieval_ranks(text_vecs, images, codes.reshape(-1))


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi)


def gap_verdicts(
    ranks_before: np.ndarray,
    ranks_after: np.ndarray,
    posts: pl.DataFrame,
    *,
    k: int = 10,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    reference: tuple[str, str] = ("descriptive", "en"),
) -> pl.DataFrame:
    """Per language: commentative R@k before/after, the gap to descriptive English before/after, with intervals.

    Parameters
    ----------
    ranks_before, ranks_after
        Per-post text-to-image ranks under the two models (:func:`text_to_image_ranks`), aligned with ``posts``.
    posts
        With ``caption_kind`` and ``lang``.
    k
        The recall cutoff.
    n_boot
        Paired bootstrap resamples (queries are drawn once per resample for both models; the reference group
        and the language group are resampled independently).
    ci
        Interval level.
    seed
        Bootstrap seed.
    reference
        The (caption_kind, lang) group the gap is measured from.

    Returns
    -------
    polars.DataFrame
        One row per commentative language: ``lang``, ``n``, ``comm_before``, ``comm_after`` (+ ``_lo``/``_hi``),
        ``change``, ``change_lo``, ``change_hi``, ``gap_before``, ``gap_after`` (+ intervals),
        ``gap_closed`` (share of the gap closed), ``desc_before``, ``desc_after`` (+ intervals), ``verdict``.
    """
    kinds = posts["caption_kind"].to_numpy()
    langs = posts["lang"].to_numpy()
    hit_b = np.asarray(ranks_before) <= k
    hit_a = np.asarray(ranks_after) <= k
    ref = np.nonzero((kinds == reference[0]) & (langs == reference[1]))[0]
    if ref.size == 0:
        raise ValueError(f"no {reference[0]} posts in {reference[1]!r}: the gap needs them")
    rng = np.random.default_rng(seed)
    ref_idx = rng.integers(0, ref.size, size=(n_boot, ref.size))
    ref_b = hit_b[ref][ref_idx].mean(1)
    ref_a = hit_a[ref][ref_idx].mean(1)
    rows = []
    for lang in sorted(set(langs[kinds == "commentative"])):
        q = np.nonzero((kinds == "commentative") & (langs == lang))[0]
        idx = rng.integers(0, q.size, size=(n_boot, q.size))
        cb = hit_b[q][idx].mean(1)
        ca = hit_a[q][idx].mean(1)
        gb, ga = ref_b - cb, ref_a - ca
        point = {
            "comm_before": float(hit_b[q].mean()),
            "comm_after": float(hit_a[q].mean()),
            "desc_before": float(hit_b[ref].mean()),
            "desc_after": float(hit_a[ref].mean()),
        }
        point["change"] = point["comm_after"] - point["comm_before"]
        point["gap_before"] = point["desc_before"] - point["comm_before"]
        point["gap_after"] = point["desc_after"] - point["comm_after"]
        row: dict[str, Any] = {"lang": lang, "n": int(q.size), **point}
        for name, samples in (
            ("comm_before", cb),
            ("comm_after", ca),
            ("change", ca - cb),
            ("gap_before", gb),
            ("gap_after", ga),
            ("desc_before", ref_b),
            ("desc_after", ref_a),
        ):
            row[f"{name}_lo"], row[f"{name}_hi"] = _interval(samples, ci)
        row["gap_closed"] = (
            1 - point["gap_after"] / point["gap_before"] if point["gap_before"] > 0 else float("nan")
        )
        row["verdict"] = _verdict(row, k)
        rows.append(row)
    return pl.DataFrame(rows)


def _verdict(r: dict[str, Any], k: int) -> str:
    lang = r["lang"]
    if r["change_lo"] > 0:
        head = f"{lang}: commentative R@{k} rose {r['comm_before']:.3f} -> {r['comm_after']:.3f}"
        tail = "the rise is outside the noise"
    elif r["change_hi"] < 0:
        head = f"{lang}: commentative R@{k} fell {r['comm_before']:.3f} -> {r['comm_after']:.3f}"
        tail = "the fall is outside the noise"
    else:
        head = f"{lang}: commentative R@{k} {r['comm_before']:.3f} -> {r['comm_after']:.3f}"
        tail = "no change beyond the noise"
    closed = r["gap_closed"]
    gap = f"gap {r['gap_before']:.3f} -> {r['gap_after']:.3f}" + (
        f" ({closed:+.0%} closed)" if np.isfinite(closed) else ""
    )
    return f"{head} (change {r['change']:+.3f}, 95% CI [{r['change_lo']:+.3f}, {r['change_hi']:+.3f}]); {gap}; {tail}"


def format_verdicts(verdicts: pl.DataFrame) -> str:
    """The verdict lines, one per language."""
    return "\n".join(verdicts["verdict"].to_list())


def gap_gallery(
    ranks_before: np.ndarray,
    ranks_after: np.ndarray,
    posts: pl.DataFrame,
    *,
    per_lang: int = 2,
    found_within: int = 5,
    missed_beyond: int = 20,
    langs: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Commentative captions the first model missed and the second finds, a few per language.

    Parameters
    ----------
    ranks_before, ranks_after
        Per-post text-to-image ranks, aligned with ``posts``.
    posts
        With ``post_id``, ``image``, ``text``, ``lang``, ``caption_kind`` (and ``image_path`` if resolved).
    per_lang
        Examples per language.
    found_within
        The second model ranks the image at most this.
    missed_beyond
        The first model ranked it beyond this.
    langs
        Languages to show (default: all commentative languages).

    Returns
    -------
    polars.DataFrame
        ``lang``, ``post_id``, ``text``, ``image`` (and ``image_path`` when present), ``rank_before``,
        ``rank_after``; the largest moves first within each language, ties broken by ``post_id``.
    """
    cols = [
        c for c in ("post_id", "image", "image_path", "text", "lang", "caption_kind") if c in posts.columns
    ]
    frame = posts.select(cols).with_columns(
        pl.Series("rank_before", np.asarray(ranks_before, np.float64)),
        pl.Series("rank_after", np.asarray(ranks_after, np.float64)),
    )
    picked = frame.filter(
        (pl.col("caption_kind") == "commentative")
        & (pl.col("rank_after") <= found_within)
        & (pl.col("rank_before") > missed_beyond)
    )
    if langs is not None:
        picked = picked.filter(pl.col("lang").is_in(list(langs)))
    picked = picked.sort(["lang", "rank_before", "post_id"], descending=[False, True, False])
    return picked.group_by("lang", maintain_order=True).head(per_lang).drop("caption_kind")
