"""The lists the Explorer shows, computed through the backend (a mixin of :class:`ExplorerState`).

Posts named by row number or ``post_id`` resolved to rows; for the open post, its neighbors under each model
(:class:`~ccclip_widgets.neighbors.NeighborIndex`, filtered inside the search) and, with two models, the rank
changes between them (:mod:`~ccclip_widgets.compare`); the free-text search hits; and the posts whose own texts
moved most between the models. Kept apart from the update path that decides when to refresh them; like the state,
it imports no widget library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import polars as pl

__all__ = ["ListsAndRows"]


class ListsAndRows:
    """Mixin: needs ``_table``, ``_n``, ``_views``, ``_mode``, ``_k``, ``_current``, ``_query``, ``_rank_changes``,
    ``_derived`` and ``_neighbor_mask`` from the state."""

    _table: pl.DataFrame
    _n: int
    _views: list[Any]
    _mode: str
    _k: int
    _current: int | None
    _query: str | None
    _rank_changes: pl.DataFrame | None
    _derived: dict[Any, Any]
    _neighbor_mask: Callable[[], np.ndarray | None]

    def text_shift(self, sort_by: str = "rank_gain", descending: bool = True) -> pl.DataFrame:
        """With two models: each post's own text under both (see :func:`ccclip_widgets.compare.text_shift`),
        sorted by ``sort_by``, with the text; the posts fine-tuning moved most come first."""
        if len(self._views) < 2:
            raise RuntimeError("text_shift compares two models: Explorer(embeddings, compare=...)")
        if "text_shift" not in self._derived:
            from ..compare import text_shift

            frame = text_shift(self._views[0].index, self._views[1].index, k=self._k)
            self._derived["text_shift"] = self._with_text(frame)
        frame = self._derived["text_shift"]
        if sort_by not in frame.columns:
            raise ValueError(f"cannot sort by {sort_by!r}; columns: {frame.columns}")
        return frame.sort(sort_by, descending=descending, nulls_last=True)

    def post(self, post: int | str) -> dict[str, Any]:
        """One post as a dict: its columns plus ``index`` (the row number)."""
        row = self._row(post)
        d = self._table.row(row, named=True)
        d["index"] = row
        return d

    # ============================================================================== neighbor and search lists
    def _refresh_neighbors(self) -> None:
        assert self._current is not None
        allowed = self._neighbor_mask()
        for v in self._views:
            query = getattr(v.index, self._mode)
            v.neighbors = self._with_text(query(self._current, self._k, allowed=allowed))
        self._rank_changes = None
        if len(self._views) == 2:
            from ..compare import neighbor_rank_changes

            a, b = self._views
            ch = neighbor_rank_changes(a.index, b.index, self._current, self._mode, self._k, allowed=allowed)
            self._rank_changes = self._with_text(ch)
            ranks = ch.select("post_id", "rank_a", "rank_b")
            for v, other in ((a, "rank_b"), (b, "rank_a")):
                assert v.neighbors is not None
                v.neighbors = v.neighbors.join(
                    ranks.select("post_id", pl.col(other).alias("rank_other")),
                    on="post_id",
                    how="left",
                    maintain_order="left",
                )
            ida, idb = a.neighbors["post_id"], b.neighbors["post_id"]
            a.neighbors = a.neighbors.with_columns(changed=~ida.is_in(idb.implode()))
            b.neighbors = b.neighbors.with_columns(changed=~idb.is_in(ida.implode()))

    def _refresh_search(self) -> None:
        if self._query is None:
            for v in self._views:
                v.search = None
            return
        from ..embed import encode_texts

        allowed = self._neighbor_mask()
        for v in self._views:
            if v.model is None:
                v.search = None
                continue
            vec = encode_texts(v.model, [self._query])[0]
            hits = v.index.query_vector(vec, target="image", k=self._k, source="text", allowed=allowed)
            v.search = self._with_text(hits)

    # ============================================================================== rows
    def _row(self, post: int | str) -> int:
        if isinstance(post, str):
            return self._views[0].index.row(post)
        if isinstance(post, (bool, np.bool_)) or not isinstance(post, (int, np.integer)):
            raise TypeError(f"expected a row number or a post_id, got {type(post).__name__}")
        return self._views[0].index.row(int(post))

    def _rows(self, posts: Iterable[int | str] | np.ndarray | None) -> np.ndarray:
        if posts is None:
            return np.zeros(0, np.int64)
        if isinstance(posts, (str, int, np.integer)):
            posts = [posts]  # type: ignore[list-item]
        if isinstance(posts, pl.Series):
            posts = posts.to_numpy()
        arr = posts if isinstance(posts, np.ndarray) else np.asarray(list(posts), dtype=object)
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.dtype.kind in "iu":
            rows = arr.astype(np.int64, copy=False).reshape(-1)
            bad = (rows < -self._n) | (rows >= self._n)
            if bad.any():
                raise IndexError(f"row {int(rows[bad][0])} out of range for {self._n} posts")
            rows = rows % self._n
        else:
            rows = np.fromiter((self._row(p) for p in arr.reshape(-1).tolist()), np.int64, count=arr.size)
        return np.unique(rows)

    def _with_text(self, frame: pl.DataFrame) -> pl.DataFrame:
        texts = (
            self._table["text"].gather(frame["index"]) if frame.height else pl.Series("text", [], pl.String)
        )
        return frame.with_columns(texts.alias("text"))
