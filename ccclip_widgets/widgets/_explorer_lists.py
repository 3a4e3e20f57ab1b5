"""The lists the Explorer shows, computed through the backend (a mixin of :class:`ExplorerState`).

Posts named by row number or ``post_id`` resolved to rows; for the open post, its neighbors under each model
(:class:`~ccclip_widgets.neighbors.NeighborIndex`, filtered inside the search) and, with two models, the rank
changes between them (:mod:`~ccclip_widgets.compare`); the free-text search hits; the posts whose own texts
moved most between the models; and the posts that share the open post's image, with the rule that picks which of
them a click on their common map point opens. Kept apart from the update path that decides when to refresh them;
like the state, it imports no widget library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import polars as pl

__all__ = ["SAME_IMAGE_LIMIT", "STACK_TOLERANCE", "ListsAndRows"]

#: How many of the posts sharing the open post's image the card lists (the others are counted as "+k more").
SAME_IMAGE_LIMIT = 8
#: Posts of one image whose map coordinates differ by at most this share of the map's extent (about 2 px on a
#: 460 px map) are one point to the eye: a click there may open any of them (see :meth:`ListsAndRows.point_post`).
#: On the demo's image map (8,000 posts, 1,600 images) the posts of every image lie within 0.12% of the extent;
#: on a text map they lie apart.
STACK_TOLERANCE = 0.005
_LISTED = ("lang", "caption_kind")


class ListsAndRows:
    """Mixin: needs ``_table``, ``_n``, ``_views``, ``_mode``, ``_k``, ``_current``, ``_query``, ``_rank_changes``,
    ``_derived``, ``_visible``, ``_color`` and ``_neighbor_mask`` from the state."""

    _table: pl.DataFrame
    _n: int
    _views: list[Any]
    _mode: str
    _k: int
    _current: int | None
    _query: str | None
    _rank_changes: pl.DataFrame | None
    _derived: dict[Any, Any]
    _visible: np.ndarray | None
    _color: Any
    _neighbor_mask: Callable[[], np.ndarray | None]

    #: Posts listed under the card as sharing its image; a view reads it, a user may change it.
    same_image_limit: int = SAME_IMAGE_LIMIT

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

    # ============================================================================== posts sharing an image
    def same_image_posts(self, post: int | str | None = None, *, limit: int | None = None) -> pl.DataFrame:
        """The other posts that share the image of ``post`` (default: the open post), in the table's order.

        Columns ``index`` (row number), ``post_id``, then ``lang`` and ``caption_kind`` where the posts have them,
        and ``text``. Empty when no other post has that image or no post is open. ``limit`` keeps the first
        ``limit`` of them; :meth:`same_image_count` counts them all. Posts share an image when they share its
        ``image_key`` (its content key), so the same picture posted under two file names counts too.
        """
        cols = ["post_id", *(c for c in _LISTED if c in self._table.columns), "text"]
        row = self._current if post is None else self._row(post)
        rows = np.zeros(0, np.int64) if row is None else self._image_rows(row)
        rows = rows[rows != row]
        if limit is not None:
            rows = rows[: max(int(limit), 0)]
        frame = self._table[rows].select(cols) if len(rows) else self._table.clear().select(cols)
        return frame.insert_column(0, pl.Series("index", rows, dtype=pl.Int64))

    def same_image_count(self, post: int | str | None = None) -> int:
        """How many other posts share the image of ``post`` (default: the open post; 0 when none is open)."""
        row = self._current if post is None else self._row(post)
        return 0 if row is None else len(self._image_rows(row)) - 1

    def point_post(self, post: int | str, view: int = 0) -> int:
        """The row a click on ``post``'s point of map ``view`` opens.

        Several posts of one image sit on one point of an image map (within :data:`STACK_TOLERANCE` of the map's
        extent); the browser reports the one nearest the pointer, and the point shows the color of the one drawn
        last (the last in the table's order among those the map filter keeps bright). Among them, the click opens
        the first in the table's order that passes the map filter, then the neighbor filter, then has the color
        the point shows; a rule is skipped when it is not set or none of them passes it. With no filter and no
        color that is the image's first post, whichever of them the browser reported. A post alone on its point
        (every post on a text map) is opened as it is. On a sampled map (more posts than ``max_points``) the
        point may show another of them: the rule assumes all are drawn.
        """
        row = self._row(post)
        rows = self._image_rows(row)
        if len(rows) < 2:
            return row
        xy = self._views[view].coords
        key = ("map_extent", view)
        if key not in self._derived:
            self._derived[key] = float(np.ptp(xy, axis=0).max()) if len(xy) else 0.0
        rows = rows[np.abs(xy[rows] - xy[row]).max(axis=1) <= STACK_TOLERANCE * self._derived[key]]
        if len(rows) < 2:
            return row
        visible, values = self._visible, self._color.values
        bright = rows if visible is None or not visible[rows].any() else rows[visible[rows]]
        top = bright[-1]  # drawn last: the point shows its color
        rules = [  # row masks, in order of weight; None where not set
            visible,
            self._neighbor_mask(),
            None if values is None else (values == values[top]) | (np.isnan(values) & np.isnan(values[top])),
        ]
        for passes in rules:  # each narrows the candidates, unless it is not set or none of them passes
            if passes is not None and passes[rows].any():
                rows = rows[passes[rows]]
        return int(rows[0])

    def _image_rows(self, row: int) -> np.ndarray:
        """Rows of every post sharing ``row``'s image (``row`` included), ascending."""
        if "image_groups" not in self._derived:
            t = self._table
            if "image_key" in t.columns:  # set by read_posts for every post
                codes = t["image_key"].cast(pl.String).rank("dense").to_numpy().astype(np.int64)
            else:
                codes = np.arange(self._n, dtype=np.int64)
            order = np.argsort(codes, kind="stable")
            self._derived["image_groups"] = (codes, order, codes[order])
        codes, order, ordered = self._derived["image_groups"]
        lo, hi = np.searchsorted(ordered, codes[row], "left"), np.searchsorted(ordered, codes[row], "right")
        return order[lo:hi].astype(np.int64)

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
