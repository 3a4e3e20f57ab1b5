"""What changed between two models of the same posts (for example stock and fine-tuned CLIP).

Pure functions over two row-aligned :class:`~ccclip_widgets.neighbors.NeighborIndex` objects (row ``i`` is the
same post in both):

* :func:`neighbor_rank_changes`: one post's neighbors under both models, with each neighbor's rank under the
  other model, so a list shows "3 -> 41" for a caption that fell and "57 -> 2" for one that rose;
* :func:`neighbor_change`: for every post, the share of its ``k`` neighbors that the two models do not share;
* :func:`text_shift`: for every post, where its own image ranks for its own text under each model, and how much
  its text's neighborhood changed: sorted, the posts fine-tuning moved most.

Ranks count distinct images when the target is images and the index knows the posts' ``image_keys`` (the
neighbor lists show each image once), otherwise posts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

if TYPE_CHECKING:  # pragma: no cover
    from .neighbors import NeighborIndex

__all__ = ["MODALITIES", "neighbor_change", "neighbor_rank_changes", "text_shift"]

#: Source and target modality of each neighbor mode.
MODALITIES: dict[str, tuple[str, str]] = {
    "image_to_texts": ("image", "text"),
    "text_to_images": ("text", "image"),
    "image_to_images": ("image", "image"),
    "text_to_texts": ("text", "text"),
}


def _check_pair(a: NeighborIndex, b: NeighborIndex) -> None:
    if a.n != b.n or not a.post_ids.equals(b.post_ids, check_names=False):
        raise ValueError("the two indexes must hold the same posts in the same row order")


def _image_codes(index: NeighborIndex) -> np.ndarray | None:
    keys = index.image_keys
    if keys is None:
        return None
    return np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1).astype(np.int64)


def _ranks_of(
    index: NeighborIndex,
    row: int,
    mode: str,
    rows: np.ndarray,
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact rank (1-based) and score of each of ``rows`` among the targets of post ``row`` under ``mode``."""
    source, target = MODALITIES[mode]
    q = index.vectors(source)[row]
    sc = (index.vectors(target) @ q).astype(np.float32)
    valid = np.ones(index.n, bool) if allowed is None else allowed.copy()
    codes = _image_codes(index) if target == "image" else None
    if source == target:
        valid[row] = False
        if codes is not None:
            valid &= codes != codes[row]
    own = sc[rows]
    if codes is not None:  # rank among distinct images: each image scores its best post
        best = np.full(int(codes.max()) + 1, -np.inf, np.float32)
        np.maximum.at(best, codes[valid], sc[valid])
        ranks = 1 + (best[None, :] > own[:, None]).sum(1)
    else:
        ranks = 1 + (sc[valid][None, :] > own[:, None]).sum(1)
    return ranks.astype(np.int32), own


def neighbor_rank_changes(
    index_a: NeighborIndex,
    index_b: NeighborIndex,
    post: int | str,
    mode: str = "image_to_texts",
    k: int = 10,
    *,
    allowed: Any = None,
) -> pl.DataFrame:
    """A post's top-``k`` neighbors under either model, each with its rank under both.

    Parameters
    ----------
    index_a, index_b
        Row-aligned indexes of the same posts under the two models ("before" and "after").
    post
        Row number or ``post_id``.
    mode
        A neighbor mode (see :data:`MODALITIES`).
    k
        Neighbors taken from each model's list.
    allowed
        Only these posts count (boolean row mask or row numbers), as in the index's queries.

    Returns
    -------
    polars.DataFrame
        ``post_id``, ``index``, ``rank_a``, ``rank_b``, ``score_a``, ``score_b``, ``change`` (``rank_a - rank_b``:
        positive when the neighbor rose under the second model), ``in_a``, ``in_b`` (in that model's top ``k``);
        ordered by ``rank_b`` then ``rank_a``.
    """
    if mode not in MODALITIES:
        raise ValueError(f"mode must be one of {list(MODALITIES)}, got {mode!r}")
    _check_pair(index_a, index_b)
    row = index_a.row(post)
    mask = index_a._allowed_mask(allowed)
    la = getattr(index_a, mode)(row, k, allowed=mask)
    lb = getattr(index_b, mode)(row, k, allowed=mask)
    rows = np.unique(np.concatenate([la["index"].to_numpy(), lb["index"].to_numpy()]))
    ra, sa = _ranks_of(index_a, row, mode, rows, mask)
    rb, sb = _ranks_of(index_b, row, mode, rows, mask)
    in_a = np.isin(rows, la["index"].to_numpy())
    in_b = np.isin(rows, lb["index"].to_numpy())
    out = pl.DataFrame(
        {
            "post_id": index_a.post_ids.gather(rows) if len(rows) else pl.Series([], dtype=pl.String),
            "index": rows.astype(np.int64),
            "rank_a": ra,
            "rank_b": rb,
            "score_a": sa,
            "score_b": sb,
            "change": ra - rb,
            "in_a": in_a,
            "in_b": in_b,
        }
    )
    return out.sort(["rank_b", "rank_a"])


def _topk(index: NeighborIndex, source: str, target: str, k: int, chunk: int = 16_384) -> np.ndarray:
    """``N x k`` neighbor rows of every post (same modality: the post itself left out)."""
    n = index.n
    same = source == target
    kk = min(n, k + int(same))
    vecs = index.vectors(source)
    out = np.empty((n, kk), np.int64)
    for s in range(0, n, chunk):
        out[s : s + chunk] = index.search(vecs[s : s + chunk], target=target, k=kk)[1]
    if same:  # drop each post itself (wherever it ranks), keep k
        rows = np.arange(n)[:, None]
        order = np.argsort(out == rows, axis=1, kind="stable")
        out = np.take_along_axis(out, order, 1)[:, : min(k, kk - 1) if kk > 1 else 0]
    return out[:, :k]


def neighbor_change(index_a: NeighborIndex, index_b: NeighborIndex, mode: str, k: int) -> np.ndarray:
    """Per post, the share (0-1, float32) of its ``k`` neighbors under ``mode`` that the two models do not share."""
    if mode not in MODALITIES:
        raise ValueError(f"mode must be one of {list(MODALITIES)}, got {mode!r}")
    _check_pair(index_a, index_b)
    source, target = MODALITIES[mode]
    k = max(1, min(int(k), index_a.n - (source == target)))
    a = _topk(index_a, source, target, k)
    b = _topk(index_b, source, target, k)
    shared = np.empty(index_a.n, np.int32)
    for s in range(0, index_a.n, 4_096):
        aa, bb = a[s : s + 4_096], b[s : s + 4_096]
        shared[s : s + 4_096] = ((aa[:, :, None] == bb[:, None, :]) & (aa[:, :, None] >= 0)).any(2).sum(1)
    return (1.0 - shared / np.float32(k)).astype(np.float32)


def _own_image_rank(index: NeighborIndex, depth: int, chunk: int = 2_048) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each post's own image for its own text (distinct images; 0 when beyond ``depth`` results), and
    the cosine of the post's own text and image."""
    n = index.n
    codes = _image_codes(index)
    if codes is None:
        codes = np.arange(n, dtype=np.int64)
    t, im = index.vectors("text"), index.vectors("image")
    own_score = np.einsum("ij,ij->i", t, im).astype(np.float32)
    ranks = np.zeros(n, np.int32)
    kk = min(n, depth)
    for s in range(0, n, chunk):
        ix = index.search(t[s : s + chunk], target="image", k=kk)[1]
        c = np.where(ix >= 0, codes[np.maximum(ix, 0)], -1)
        # a position starts a new image unless the same image appeared earlier in the row
        earlier = (c[:, :, None] == c[:, None, :]) & np.tri(kk, k=-1, dtype=bool).T[None]
        new = ~earlier.any(1) & (c >= 0)
        distinct_rank = np.cumsum(new, axis=1)
        hit = c == codes[s : s + chunk, None]
        found = hit.any(1)
        first = hit.argmax(1)
        ranks[s : s + chunk] = np.where(found, distinct_rank[np.arange(len(c)), first], 0)
    return ranks, own_score


def text_shift(
    index_a: NeighborIndex, index_b: NeighborIndex, *, k: int = 10, depth: int = 100
) -> pl.DataFrame:
    """How each post's own text moved between the two models.

    Parameters
    ----------
    index_a, index_b
        Row-aligned indexes of the same posts ("before" and "after").
    k
        Neighbors compared for ``text_neighbors_changed``.
    depth
        Results searched for the post's own image; a rank beyond it is reported as ``null``.

    Returns
    -------
    polars.DataFrame
        One row per post: ``post_id``, ``index``, ``rank_a``, ``rank_b`` (rank of the post's own image among
        the images nearest its text), ``rank_gain`` (``rank_a - rank_b``, an unranked image counted at
        ``depth + 1``: positive when the text found its image better under the second model), ``score_a``,
        ``score_b``, ``score_change`` (cosine of the post's own text and image), ``text_neighbors_changed`` (share
        of its text's ``k`` nearest texts that differ). Sorted by ``rank_gain``, largest first.
    """
    _check_pair(index_a, index_b)
    ra, sa = _own_image_rank(index_a, depth)
    rb, sb = _own_image_rank(index_b, depth)
    fa = np.where(ra > 0, ra, depth + 1)
    fb = np.where(rb > 0, rb, depth + 1)
    moved = neighbor_change(index_a, index_b, "text_to_texts", k)
    frame = pl.DataFrame(
        {
            "post_id": index_a.post_ids,
            "index": np.arange(index_a.n, dtype=np.int64),
            "rank_a": pl.Series(ra).replace(0, None),
            "rank_b": pl.Series(rb).replace(0, None),
            "rank_gain": (fa - fb).astype(np.int32),
            "score_a": sa,
            "score_b": sb,
            "score_change": (sb - sa).astype(np.float32),
            "text_neighbors_changed": moved,
        }
    )
    return frame.sort(["rank_gain", "score_change"], descending=True)
