"""Retrieval metrics for image + text posts, grouped by caption kind and language.

The C-CLIP question is how well a caption finds its image (and an image its captions) when captions comment on the
image instead of describing it. This module measures it with plain arrays: rank of the true match, Recall@k with
bootstrap confidence intervals, per group (``caption_kind`` x ``lang`` by default), for one or several models in one
table; and a per-post "commentativeness" score.

Conventions
-----------
Ranks and ties
    The rank of a query is the 1-based rank of its *best-ranked positive* among all candidates, by cosine
    similarity. Candidates with exactly the same score as that positive are ties. We use the **mid-rank**:
    the mean of the optimistic rank (the positive placed before every tied negative) and the pessimistic rank
    (after every tied negative), i.e. ``1 + n_greater + n_tied_negatives / 2``. For a single positive this is the
    expected rank under random tie-breaking; a query tied with an odd number of negatives gets a rank ending in
    ``.5``. Recall@k counts queries whose rank is ``<= k`` (so a 2-way tie at places 10 and 11, rank 10.5, is not a
    hit at k = 10). Other positives tied with the best one are not negatives and do not move the rank.
Positives and shared images
    Posts that share an image (same ``image_key``) are not wrong answers for each other. Text-to-image searches the
    *unique* images of the pool (one vector per ``image_key``), and the positive of a text is its own image key.
    Image-to-text: each unique image queries the texts of the pool, and every text of a pool post with that image
    key is a positive (for example one image posted with captions in three languages has three positives).
Pools
    ``pool="all"`` (the default): every post of ``posts`` is a candidate for every group, so groups are ranked
    against the same candidates and share one chance level. For image-to-text, a query image's positives are its
    captions *in the group*; its captions outside the group are left out of its candidates (neither right nor
    wrong), so the German commentative group is not answered by the image's English descriptive caption.
    ``pool="group"``: the candidates for a group (say commentative / uk) are the posts of that group only, so pool
    sizes differ between groups. The ``pool_size`` column states the number of candidates (unique images for
    text-to-image, texts for image-to-text), and ``chance_r_at_K = min(1, K / pool_size)`` the Recall@K of a
    random ranking with one positive.
One engine
    :func:`group_ranks` computes the ranks of every group; :func:`evaluate_retrieval` (the command line, the Gap
    view, ``ccclip demo``) and the training-time evaluation (:func:`ccclip_widgets.train.retrieval_metrics`,
    the FineTune panel) all summarize its output, so the same vectors give the same numbers everywhere.
Confidence intervals
    Percentile bootstrap over queries (``n_boot`` resamples of the queries with replacement, interval
    ``[(1 - ci) / 2, (1 + ci) / 2]`` quantiles). Recall@k depends on a query only through which of the rank bands
    ``(0, k1], (k1, k2], ..., (k_last, inf)`` its rank falls in, so resampling queries is exactly a multinomial draw
    of band counts: the bootstrap is computed from ``n_boot`` multinomial draws, with no loop over resamples and no
    ``n_boot x n`` index matrix. Intervals reflect query sampling only (not seeds of training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl

__all__ = [
    "GroupRanks",
    "commentativeness",
    "commentativeness_auc",
    "evaluate_retrieval",
    "format_gap_table",
    "group_ranks",
    "recall_summary",
    "retrieval_ranks",
]

Direction = Literal["text_to_image", "image_to_text"]
_DIRECTIONS: tuple[str, ...] = ("text_to_image", "image_to_text")

#: Largest number of similarity entries (queries x candidates) held at once by :func:`retrieval_ranks`
#: (2**26 float32 = 256 MiB); ``chunk_size`` is lowered to fit when the pool is large.
MAX_CHUNK_ELEMENTS = 1 << 26


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N x D), got shape {arr.shape}")
    return arr


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if x.shape[0] and np.abs(norms - 1.0).max() > 1e-3:
        return x / np.maximum(norms, 1e-12)[:, None]
    return x


def retrieval_ranks(
    query_vecs: Any,
    candidate_vecs: Any,
    positives: Any,
    *,
    candidate_groups: Any | None = None,
    candidate_mask: Any | None = None,
    chunk_size: int = 4096,
) -> np.ndarray:
    """Rank of the best-ranked positive candidate for each query (1-based, mid-rank for ties).

    Scores are cosine similarities (rows are L2-normalized here if they are not). Only ``chunk x M`` scores exist
    at any time, so 100k x 100k never materializes.

    Parameters
    ----------
    query_vecs
        ``Q x D`` query vectors (numpy array or torch tensor).
    candidate_vecs
        ``M x D`` candidate vectors.
    positives
        ``Q`` integers. Without ``candidate_groups``: the index of each query's single positive candidate. With
        ``candidate_groups``: a group id per query; query ``i``'s positives are the candidates ``j`` with
        ``candidate_groups[j] == positives[i]``.
    candidate_groups
        ``M`` integer group ids of the candidates (for example codes of their image key).
    candidate_mask
        ``M`` booleans (with ``candidate_groups``): a candidate of the query's own group counts as a positive only
        where this is True; where it is False it is left out for that query (neither positive nor negative).
        Candidates of other groups are negatives either way.
    chunk_size
        Queries scored at once (lowered so a chunk holds at most :data:`MAX_CHUNK_ELEMENTS` scores).

    Returns
    -------
    numpy.ndarray
        ``Q`` float64 ranks: ``1 + (# negatives scoring higher than the best positive) + (# negatives tied with
        it) / 2``. See the module docstring for the tie rule.

    Raises
    ------
    ValueError
        If shapes disagree or a query has no positive among the candidates.
    """
    q = _unit(_as_array(query_vecs, "query_vecs"))
    c = _unit(_as_array(candidate_vecs, "candidate_vecs"))
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query dimension {q.shape[1]} != candidate dimension {c.shape[1]}")
    n_q, n_c = q.shape[0], c.shape[0]
    pos = np.asarray(positives).astype(np.int64).reshape(-1)
    if len(pos) != n_q:
        raise ValueError(f"positives has {len(pos)} entries for {n_q} queries")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n_q == 0:
        return np.zeros(0, np.float64)
    if candidate_groups is None:
        if n_c == 0 or pos.min() < 0 or pos.max() >= n_c:
            raise ValueError(f"positives must be candidate indices in [0, {n_c})")
        members = pos[:, None]  # Q x 1: the single positive of each query
    else:
        groups = np.asarray(candidate_groups).astype(np.int64).reshape(-1)
        if len(groups) != n_c:
            raise ValueError(f"candidate_groups has {len(groups)} entries for {n_c} candidates")
        members = _group_members(groups, pos)
    excluded = None
    if candidate_mask is not None:
        if candidate_groups is None:
            raise ValueError("candidate_mask needs candidate_groups")
        cmask = np.asarray(candidate_mask, dtype=bool).reshape(-1)
        if len(cmask) != n_c:
            raise ValueError(f"candidate_mask has {len(cmask)} entries for {n_c} candidates")
        valid = members >= 0
        keep = valid & cmask[np.maximum(members, 0)]
        if np.any(~keep.any(axis=1)):
            bad = int(np.flatnonzero(~keep.any(axis=1))[0])
            raise ValueError(f"query {bad} (group {int(pos[bad])}) has no positive among the candidates")
        excluded = np.where(valid & ~keep, members, -1)
        members = np.where(keep, members, -1)
    chunk = max(1, min(int(chunk_size), MAX_CHUNK_ELEMENTS // max(n_c, 1)))
    ranks = np.empty(n_q, np.float64)
    for s in range(0, n_q, chunk):
        e = min(n_q, s + chunk)
        scores = q[s:e] @ c.T  # chunk x M
        mem = members[s:e]
        valid = mem >= 0
        pos_scores = np.where(valid, np.take_along_axis(scores, np.maximum(mem, 0), 1), -np.inf)
        best = pos_scores.max(axis=1)
        greater = (scores > best[:, None]).sum(axis=1)
        equal = (scores == best[:, None]).sum(axis=1)
        tied_pos = (pos_scores == best[:, None]).sum(axis=1)  # positives at the best score, the best included
        if excluded is not None:  # left-out candidates neither outrank nor tie
            ex = excluded[s:e]
            ex_scores = np.where(ex >= 0, np.take_along_axis(scores, np.maximum(ex, 0), 1), -np.inf)
            greater -= (ex_scores > best[:, None]).sum(axis=1)
            equal -= (ex_scores == best[:, None]).sum(axis=1)
        ranks[s:e] = 1.0 + greater + (equal - tied_pos) / 2.0
    return ranks


def _group_members(groups: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """``len(wanted) x max_size`` candidate indices of each wanted group, ``-1``-padded; error if one is empty."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    start = np.searchsorted(sorted_groups, wanted, side="left")
    stop = np.searchsorted(sorted_groups, wanted, side="right")
    size = stop - start
    if np.any(size == 0):
        bad = int(np.flatnonzero(size == 0)[0])
        raise ValueError(f"query {bad} (group {int(wanted[bad])}) has no positive among the candidates")
    width = int(size.max())
    offs = np.arange(width)
    idx = start[:, None] + offs[None, :]
    ok = offs[None, :] < size[:, None]
    return np.where(ok, order[np.minimum(idx, len(order) - 1)], -1)


def _bootstrap_recall(
    ranks: np.ndarray, ks: Sequence[int], n_boot: int, ci: float, rng: np.random.Generator
) -> dict[int, tuple[float, float, float]]:
    """Recall@k with percentile bootstrap intervals, by multinomial draws of rank-band counts."""
    n = len(ranks)
    ks_sorted = sorted(set(int(k) for k in ks))
    if n == 0:
        return {k: (float("nan"), float("nan"), float("nan")) for k in ks_sorted}
    # Band b holds queries with ks[b-1] < rank <= ks[b]; the last band is rank > max(ks).
    band = np.searchsorted(np.asarray(ks_sorted, np.float64), ranks, side="left")
    counts = np.bincount(band, minlength=len(ks_sorted) + 1)
    p = counts / n
    out: dict[int, tuple[float, float, float]] = {}
    draws = rng.multinomial(n, p, size=n_boot) if n_boot > 0 else None
    alpha = (1.0 - ci) / 2.0
    for b, k in enumerate(ks_sorted):
        est = float(counts[: b + 1].sum() / n)
        if draws is None:
            out[k] = (est, float("nan"), float("nan"))
            continue
        boot = draws[:, : b + 1].sum(axis=1) / n
        lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
        out[k] = (est, float(lo), float(hi))
    return out


@dataclass(frozen=True)
class GroupRanks:
    """The ranks of one group's queries in one direction (see :func:`group_ranks`).

    Attributes
    ----------
    ranks
        Mid-rank of each query's best positive (float64; text queries: one per post of the group; image
        queries: one per unique image of the group).
    pool_size
        Candidates each query was ranked against (unique images, or texts).
    """

    ranks: np.ndarray
    pool_size: int


def group_ranks(
    image_vectors: Any,
    text_vectors: Any,
    image_keys: Any,
    groups: Mapping[Any, Any],
    *,
    directions: Sequence[str] = _DIRECTIONS,
    pool: Literal["group", "all"] = "all",
    chunk_size: int = 4096,
) -> dict[tuple[str, Any], GroupRanks]:
    """Ranks of every group of posts in both directions: the one retrieval engine of the toolkit.

    Parameters
    ----------
    image_vectors, text_vectors
        ``N x D`` vectors of the posts (rows aligned; normalized here if they are not).
    image_keys
        ``N`` image keys (any hashable values): posts with the same key share an image.
    groups
        ``{name: rows}``: a boolean mask over the ``N`` posts or an array of row numbers, per group.
    directions
        ``"text_to_image"`` and/or ``"image_to_text"``.
    pool
        ``"all"``: every post is a candidate for every group; ``"group"``: a group's own posts only (see the
        module notes for both, and for the tie rule).
    chunk_size
        Queries scored at once.

    Returns
    -------
    dict
        ``{(direction, group name): GroupRanks}`` in the order direction, then group.
    """
    if pool not in ("group", "all"):
        raise ValueError(f"pool must be 'group' or 'all', got {pool!r}")
    for d in directions:
        if d not in _DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; use {_DIRECTIONS}")
    img = _unit(_as_array(image_vectors, "image_vectors"))
    txt = _unit(_as_array(text_vectors, "text_vectors"))
    n = img.shape[0]
    keys = np.asarray(image_keys)
    if not (txt.shape[0] == n == len(keys)):
        raise ValueError(f"got {n} image vectors, {txt.shape[0]} text vectors and {len(keys)} image keys")
    codes = (
        np.unique(keys, return_inverse=True)[1].reshape(-1).astype(np.int64) if n else np.zeros(0, np.int64)
    )
    rows_of: dict[Any, np.ndarray] = {}
    for name, sel in groups.items():
        sel = np.asarray(sel)
        rows_of[name] = np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64).reshape(-1)
    all_rows = np.arange(n, dtype=np.int64)
    out: dict[tuple[str, Any], GroupRanks] = {}
    for direction in directions:
        cache_all: np.ndarray | None = None  # pool="all", text -> image: one ranking serves every group
        for name, rows in rows_of.items():
            pool_rows = rows if pool == "group" else all_rows
            if direction == "text_to_image":
                ukeys, first = np.unique(codes[pool_rows], return_index=True)
                cand = img[pool_rows[first]]
                if pool == "all":
                    if cache_all is None:
                        cache_all = retrieval_ranks(
                            txt, cand, codes, candidate_groups=ukeys, chunk_size=chunk_size
                        )
                    ranks = cache_all[rows]
                else:
                    ranks = retrieval_ranks(
                        txt[rows], cand, codes[rows], candidate_groups=ukeys, chunk_size=chunk_size
                    )
                pool_size = len(ukeys)
            else:
                qkeys, qfirst = np.unique(codes[rows], return_index=True)
                mask = None
                if pool == "all" and len(rows) < n:
                    mask = np.zeros(n, dtype=bool)
                    mask[rows] = True  # the query image's captions outside the group are left out
                ranks = retrieval_ranks(
                    img[rows[qfirst]],
                    txt[pool_rows],
                    qkeys,
                    candidate_groups=codes[pool_rows],
                    candidate_mask=mask,
                    chunk_size=chunk_size,
                )
                pool_size = len(pool_rows)
            out[(direction, name)] = GroupRanks(ranks, int(pool_size))
    return out


def recall_summary(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``r_at_k`` (share of ranks ``<= k``), ``median_rank`` and ``mean_rank`` of a group's ranks (NaN if empty).

    Parameters
    ----------
    ranks
        From :func:`group_ranks`.
    ks
        Recall cutoffs.

    Returns
    -------
    dict[str, float]
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    empty = ranks.size == 0
    out = {f"r_at_{k}": float("nan") if empty else float(np.mean(ranks <= k)) for k in ks}
    out["median_rank"] = float("nan") if empty else float(np.median(ranks))
    out["mean_rank"] = float("nan") if empty else float(np.mean(ranks))
    return out


def _model_vectors(embeddings: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Normalize the accepted inputs to ``{name: (image_vectors, text_vectors)}``."""

    def pair(v: Any) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            img, txt = v
        elif hasattr(v, "image_vectors") and hasattr(v, "text_vectors"):
            img, txt = v.image_vectors, v.text_vectors
        else:
            raise TypeError(
                "each model must be an (image_vectors, text_vectors) pair or an object with "
                f"image_vectors/text_vectors attributes, got {type(v).__name__}"
            )
        return _unit(_as_array(img, "image_vectors")), _unit(_as_array(txt, "text_vectors"))

    if isinstance(embeddings, Mapping):
        return {str(name): pair(v) for name, v in embeddings.items()}
    return {"model": pair(embeddings)}


def evaluate_retrieval(
    embeddings_or_models: Any,
    posts: pl.DataFrame,
    *,
    group_by: Sequence[str] = ("caption_kind", "lang"),
    directions: Sequence[Direction] = _DIRECTIONS,
    ks: Sequence[int] = (1, 5, 10),
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    pool: Literal["group", "all"] = "all",
    chunk_size: int = 4096,
) -> pl.DataFrame:
    """Recall@k, ranks and bootstrap intervals per model, direction and group of posts.

    Parameters
    ----------
    embeddings_or_models
        ``{model_name: (image_vectors, text_vectors)}`` with rows aligned to ``posts`` (or one pair, named
        ``"model"``; objects with ``image_vectors`` and ``text_vectors`` attributes are accepted too).
    posts
        The posts: ``post_id``, ``image_key`` (posts sharing an image share a key; if absent every post has its
        own image) and the ``group_by`` columns. Missing ``group_by`` columns are skipped.
    group_by
        Columns defining groups; one output row per model, direction and group value combination.
    directions
        ``"text_to_image"`` and/or ``"image_to_text"`` (see the module docstring for positives).
    ks
        Cutoffs for Recall@k (columns ``r_at_{k}``, ``r_at_{k}_lo``, ``r_at_{k}_hi``).
    n_boot
        Bootstrap resamples of the queries (0 disables intervals).
    ci
        Confidence level of the percentile intervals.
    seed
        Seed of the bootstrap (each output row draws from its own stream derived from it).
    pool
        ``"all"`` (default): every post is a candidate for every group; ``"group"``: a group's candidates are its
        own posts.
    chunk_size
        Queries scored at once.

    Returns
    -------
    polars.DataFrame
        Columns ``model``, ``direction``, the group columns, ``n_queries``, ``pool_size``, per k ``r_at_k``,
        ``r_at_k_lo``, ``r_at_k_hi``, then ``median_rank``, ``mean_rank`` and ``chance_r_at_{max k}``.
    """
    if pool not in ("group", "all"):
        raise ValueError(f"pool must be 'group' or 'all', got {pool!r}")
    for d in directions:
        if d not in _DIRECTIONS:
            raise ValueError(f"unknown direction {d!r}; use {_DIRECTIONS}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    models = _model_vectors(embeddings_or_models)
    n = posts.height
    for name, (img, txt) in models.items():
        if img.shape[0] != n or txt.shape[0] != n:
            raise ValueError(
                f"model {name!r}: {img.shape[0]} image and {txt.shape[0]} text vectors for {n} posts; rows must "
                "align with posts"
            )
    gcols = [g for g in group_by if g in posts.columns]
    if "image_key" in posts.columns:
        key_series = posts["image_key"].cast(pl.String)
    elif "post_id" in posts.columns:
        key_series = posts["post_id"].cast(pl.String)
    else:
        key_series = pl.Series([str(i) for i in range(n)])
    keys = key_series.fill_null("").to_numpy()

    frame = posts.select(gcols).with_row_index("__row") if gcols else pl.DataFrame({"__row": np.arange(n)})
    if gcols:
        grouped = frame.group_by(gcols, maintain_order=True).agg(pl.col("__row")).sort(gcols, nulls_last=True)
        group_rows = {
            tuple(r[c] for c in gcols): np.asarray(r["__row"], np.int64)
            for r in grouped.iter_rows(named=True)
        }
    else:
        group_rows = {(): np.arange(n, dtype=np.int64)}

    kmax = ks[-1]
    records: list[dict[str, Any]] = []
    stream = 0
    for name, (img, txt) in models.items():
        ranked = group_ranks(
            img, txt, keys, group_rows, directions=directions, pool=pool, chunk_size=chunk_size
        )
        for (direction, gvals), result in ranked.items():
            ranks, pool_size = result.ranks, result.pool_size
            rng = np.random.default_rng([seed, stream])
            stream += 1
            rec: dict[str, Any] = {"model": name, "direction": direction}
            rec.update(dict(zip(gcols, gvals)))
            rec["n_queries"] = len(ranks)
            rec["pool_size"] = int(pool_size)
            for k, (est, lo, hi) in _bootstrap_recall(ranks, ks, n_boot, ci, rng).items():
                rec[f"r_at_{k}"] = est
                rec[f"r_at_{k}_lo"] = lo
                rec[f"r_at_{k}_hi"] = hi
            summary = recall_summary(ranks, ())
            rec["median_rank"] = summary["median_rank"]
            rec["mean_rank"] = summary["mean_rank"]
            rec[f"chance_r_at_{kmax}"] = min(1.0, kmax / pool_size) if pool_size else float("nan")
            records.append(rec)
    schema: dict[str, Any] = {"model": pl.String, "direction": pl.String}
    for g in gcols:
        schema[g] = posts.schema[g]
    schema.update({"n_queries": pl.Int64, "pool_size": pl.Int64})
    for k in ks:
        schema.update({f"r_at_{k}": pl.Float64, f"r_at_{k}_lo": pl.Float64, f"r_at_{k}_hi": pl.Float64})
    schema.update({"median_rank": pl.Float64, "mean_rank": pl.Float64, f"chance_r_at_{kmax}": pl.Float64})
    return pl.DataFrame(records, schema=schema)


def format_gap_table(df: pl.DataFrame, *, digits: int = 2) -> str:
    """A compact text table of an :func:`evaluate_retrieval` result, for the command line.

    One line per model and group (for example model x caption kind x language): text-to-image R@1, R@5, R@10 and
    image-to-text R@10, each with its confidence interval, plus the number of queries and the pool size.

    Parameters
    ----------
    df
        Output of :func:`evaluate_retrieval`.
    digits
        Decimals shown.

    Returns
    -------
    str
    """
    known = {"model", "direction", "n_queries", "pool_size", "median_rank", "mean_rank"}
    gcols = [c for c in df.columns if c not in known and not c.startswith(("r_at_", "chance_r_at_"))]
    ks = sorted({int(c.split("_")[2]) for c in df.columns if c.startswith("r_at_") and c.count("_") == 2})

    def cell(row: dict[str, Any] | None, k: int) -> str:
        if row is None or f"r_at_{k}" not in row:
            return "-"
        est, lo, hi = row[f"r_at_{k}"], row.get(f"r_at_{k}_lo"), row.get(f"r_at_{k}_hi")
        if est is None or np.isnan(est):
            return "-"
        if lo is None or hi is None or np.isnan(lo):
            return f"{est:.{digits}f}"
        return f"{est:.{digits}f} [{lo:.{digits}f},{hi:.{digits}f}]"

    t2i = {
        (r["model"], *(r[g] for g in gcols)): r
        for r in df.filter(pl.col("direction") == "text_to_image").iter_rows(named=True)
    }
    i2t = {
        (r["model"], *(r[g] for g in gcols)): r
        for r in df.filter(pl.col("direction") == "image_to_text").iter_rows(named=True)
    }
    keys = list(dict.fromkeys([*t2i.keys(), *i2t.keys()]))
    t2i_ks = [k for k in ks if k in (1, 5, 10)] or ks
    i2t_k = 10 if 10 in ks else (ks[-1] if ks else 10)
    header = ["model", *gcols, "n", "pool", *(f"t2i R@{k}" for k in t2i_ks), f"i2t R@{i2t_k}"]
    lines = []
    for key in keys:
        a, b = t2i.get(key), i2t.get(key)
        ref = a or b
        assert ref is not None
        lines.append(
            [
                str(key[0]),
                *("" if v is None else str(v) for v in key[1:]),
                str(ref["n_queries"]),
                str(ref["pool_size"]),
                *(cell(a, k) for k in t2i_ks),
                cell(b, i2t_k),
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def commentativeness(
    image_vectors: Any, text_vectors: Any, image_keys: Any, *, chunk_size: int = 4096
) -> np.ndarray:
    """How little a post's text points to its own image: a score per post in ``[0, 1]``.

    Each post's text ranks all unique images (one per image key) by cosine similarity; the score is the rank
    percentile of the post's own image, ``(rank - 1) / (n_unique_images - 1)``: 0 when its own image ranks first
    (a descriptive caption, as far as the model can tell), 1 when it ranks last (nothing in the text points to the
    image: purely commentative). Ties use the mid-rank rule of :func:`retrieval_ranks`. With one unique image
    every score is 0.

    Parameters
    ----------
    image_vectors, text_vectors
        ``N x D`` vectors of the posts (rows aligned).
    image_keys
        ``N`` image keys; posts with the same key share an image.
    chunk_size
        Texts scored at once.

    Returns
    -------
    numpy.ndarray
        ``N`` float64 scores.
    """
    img = _unit(_as_array(image_vectors, "image_vectors"))
    txt = _unit(_as_array(text_vectors, "text_vectors"))
    keys = np.asarray(image_keys)
    if not (len(keys) == img.shape[0] == txt.shape[0]):
        raise ValueError(f"got {img.shape[0]} images, {txt.shape[0]} texts and {len(keys)} image keys")
    if len(keys) == 0:
        return np.zeros(0, np.float64)
    ukeys, first, codes = np.unique(keys, return_index=True, return_inverse=True)
    codes = codes.reshape(-1)
    m = len(ukeys)
    if m == 1:
        return np.zeros(len(keys), np.float64)
    ranks = retrieval_ranks(txt, img[first], codes, chunk_size=chunk_size)
    return (ranks - 1.0) / (m - 1.0)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(xs)]])
    avg = (starts + stops + 1) / 2.0  # mean of 1-based positions start+1 .. stop
    ranks_sorted = np.repeat(avg, stops - starts)
    out = np.empty(len(x), np.float64)
    out[order] = ranks_sorted
    return out


def commentativeness_auc(
    scores: Any, caption_kind: Any, *, positive: str = "commentative", negative: str = "descriptive"
) -> float:
    """ROC AUC of ``scores`` for telling commentative from descriptive captions.

    The probability that a random commentative post scores higher than a random descriptive one (ties count
    half), computed from average ranks (Mann-Whitney U); posts of other kinds are ignored.

    Parameters
    ----------
    scores
        ``N`` scores, for example from :func:`commentativeness`.
    caption_kind
        ``N`` labels (strings, or booleans with True meaning commentative).
    positive, negative
        The labels of the two classes.

    Returns
    -------
    float
        AUC in ``[0, 1]``; 0.5 is chance. NaN if a class is empty.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    kinds = np.asarray(caption_kind)
    if len(kinds) != len(s):
        raise ValueError(f"{len(s)} scores but {len(kinds)} caption kinds")
    if kinds.dtype == bool:
        is_pos, is_neg = kinds, ~kinds
    else:
        kinds = kinds.astype(str)
        is_pos, is_neg = kinds == positive, kinds == negative
    keep = (is_pos | is_neg) & ~np.isnan(s)
    s, is_pos = s[keep], is_pos[keep]
    n_pos = int(is_pos.sum())
    n_neg = len(s) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    u = r[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
