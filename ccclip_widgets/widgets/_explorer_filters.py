"""Filters, derived columns and colors of the Explorer's state (a mixin of :class:`ExplorerState`).

Kept apart from the update path so each module stays readable; like the state, it imports no widget library.
The neighbor filter becomes a row mask that the backend's neighbor search applies; the map filter becomes the mask
of posts that stay bright on the map; derived columns (clusters, commentativeness, neighbor change) come from the
backend on first use and are cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from ._colors import MISSING, NO_COLOR, ColorSpec, category_key, column_color
from ._common import INTERNAL_COLUMNS
from ._explorer_build import as_float_column

__all__ = ["DERIVED_COLUMNS", "KNOWN_CATEGORIES", "FiltersAndColors", "default_color"]

#: Columns computed on demand (through the backend), not read from the posts table.
DERIVED_COLUMNS: dict[str, str] = {
    "cluster": "cluster of the map (HDBSCAN over the 2-D layout, else k-means), named by its words",
    "commentativeness": "how poorly the post's own text matches its image (evaluate.commentativeness)",
    "neighbor_change": "share of a post's neighbors (current mode) that differ between the two models",
}

#: Columns offered first as neighbor and map filters.
KNOWN_CATEGORIES = ("caption_kind", "lang", "split")
_NOISE = "(noise)"
_MAX_FILTER_VALUES = 50


class FiltersAndColors:
    """Mixin: needs ``_table``, ``_n``, ``_views``, ``_mode``, ``_k``, ``_seed``, ``_derived``, ``_neighbor_filter``,
    ``_map_filter``, ``embeddings`` and ``coords`` from the state."""

    _table: pl.DataFrame
    _n: int
    _views: list[Any]
    _mode: str
    _k: int
    _seed: int
    _derived: dict[Any, Any]
    _neighbor_filter: dict[str, list[str]]
    _map_filter: dict[str, Any]
    embeddings: Any
    coords: np.ndarray

    def neighbor_filter_options(self) -> list[tuple[str, dict[str, str]]]:
        """Ready-made neighbor filters for a menu: any post, each caption kind, each language, and each caption
        kind in each language (``"commentative \u00b7 uk"``)."""
        t = self._table
        out: list[tuple[str, dict[str, str]]] = [("any post", {})]
        kinds = _small_values(t, "caption_kind")
        langs = _small_values(t, "lang")
        out += [(k, {"caption_kind": k}) for k in kinds]
        out += [(f"lang {lg}", {"lang": lg}) for lg in langs]
        if kinds and langs:
            pairs = t.select("caption_kind", "lang").unique().drop_nulls()
            for kd in kinds:
                for lg in langs:
                    if pairs.filter((pl.col("caption_kind") == kd) & (pl.col("lang") == lg)).height:
                        out.append((f"{kd} \u00b7 {lg}", {"caption_kind": kd, "lang": lg}))
        return out

    def map_filter_options(self) -> dict[str, str]:
        """Columns the map can be filtered by, each ``"values"`` (categorical) or ``"range"`` (numbers, times)."""
        out: dict[str, str] = {}
        for name in [*KNOWN_CATEGORIES, "cluster", "commentativeness", *self._table.columns]:
            if (
                name in out
                or name in INTERNAL_COLUMNS
                or (name not in self._table.columns and name not in DERIVED_COLUMNS)
            ):
                continue
            if name == "neighbor_change":
                continue
            s = self._column(name)
            if s.dtype in (pl.String, pl.Boolean, pl.Categorical) or name == "cluster":
                if s.n_unique() <= _MAX_FILTER_VALUES:
                    out[name] = "values"
            elif s.dtype.is_numeric() or s.dtype.is_temporal():
                out[name] = "range"
        return out

    def filter_values(self, column: str) -> list[str]:
        """The values a categorical map filter offers for ``column`` (most frequent first is not needed: sorted)."""
        s = self._column(column).cast(pl.String).fill_null(MISSING)
        return sorted(s.unique().to_list(), key=category_key)

    @property
    def color_options(self) -> list[str]:
        """Columns the map can be colored by: known columns, derived scores, then metadata."""
        t = self._table
        opts = [NO_COLOR] + [c for c in KNOWN_CATEGORIES if c in t.columns]
        opts += ["cluster", "commentativeness"] + (["neighbor_change"] if len(self._views) > 1 else [])
        for name, dtype in t.schema.items():
            if name in INTERNAL_COLUMNS or name in opts or name in DERIVED_COLUMNS:
                continue
            if dtype.is_numeric() or dtype.is_temporal() or dtype in (pl.String, pl.Boolean, pl.Categorical):
                opts.append(name)
        return opts

    @property
    def clusters(self) -> pl.DataFrame:
        """The map's clusters: ``cluster``, ``label`` (its characteristic words), ``size``, ``x``, ``y``."""
        if "clusters" not in self._derived:
            from .. import clusters

            codes = self._cluster_codes()
            words = clusters.label_clusters(
                self._table["text"].to_list(),
                codes,
                langs=self._table["lang"].to_list() if "lang" in self._table.columns else None,
            )
            centers = clusters.cluster_centers(self.coords, codes)
            ids = sorted(words)
            sizes = np.bincount(codes[codes >= 0], minlength=len(ids) or 1)
            self._derived["clusters"] = pl.DataFrame(
                {
                    "cluster": pl.Series(ids, dtype=pl.Int32),
                    "label": [" \u00b7 ".join(words[c]) for c in ids],
                    "size": pl.Series([int(sizes[c]) for c in ids], dtype=pl.Int64),
                    "x": pl.Series([centers[c][0] for c in ids], dtype=pl.Float32),
                    "y": pl.Series([centers[c][1] for c in ids], dtype=pl.Float32),
                }
            )
        return self._derived["clusters"]

    # ============================================================================== masks, columns, colors
    def _column(self, name: str) -> pl.Series:
        """A column of the posts, or a derived one, as a Series of length N."""
        if name in self._table.columns and name not in INTERNAL_COLUMNS:
            return self._table[name]
        if name == "cluster":
            return pl.Series(name, self._cluster_codes())
        if name == "commentativeness":
            return pl.Series(name, self._derived_values("commentativeness"))
        if name == "neighbor_change" and len(self._views) > 1:
            return pl.Series(name, self._derived_values("neighbor_change"))
        raise ValueError(
            f"no column {name!r}; columns: {[c for c in self._table.columns if c not in INTERNAL_COLUMNS]}"
        )

    def _neighbor_mask(self) -> np.ndarray | None:
        if not self._neighbor_filter:
            return None
        mask = np.ones(self._n, bool)
        for col, values in self._neighbor_filter.items():
            s = self._table[col].cast(pl.String).fill_null(MISSING)
            mask &= s.is_in(values).to_numpy()
        return mask

    def _map_mask(self) -> np.ndarray | None:
        if not self._map_filter:
            return None
        mask = np.ones(self._n, bool)
        for col, spec in self._map_filter.items():
            s = self._column(col)
            if isinstance(spec, tuple):
                lo, hi = spec
                m = pl.Series(np.ones(self._n, bool))
                if lo is not None:
                    m = m & (s >= lo).fill_null(False)
                if hi is not None:
                    m = m & (s <= hi).fill_null(False)
                mask &= m.to_numpy()
            else:
                mask &= s.cast(pl.String).fill_null(MISSING).is_in(spec).to_numpy()
        return mask

    def _make_color(self, column: str) -> ColorSpec:
        if column == NO_COLOR or column is None:
            return ColorSpec(NO_COLOR, "none")
        if column not in self.color_options:
            raise ValueError(f"cannot color by {column!r}; choose one of {self.color_options}")
        if column == "cluster":
            codes = self._cluster_codes()
            names = self.clusters["label"].to_list()
            cats = [f"{i}: {w}" if w else str(i) for i, w in enumerate(names)]
            values = codes.copy()
            if (codes < 0).any():
                cats.append(_NOISE)
                values[codes < 0] = len(cats) - 1
            return ColorSpec(column, "categorical", values, cats)
        if column in ("commentativeness", "neighbor_change"):
            return ColorSpec(column, "continuous", self._derived_values(column))
        return column_color(self._table[column])

    def _cluster_codes(self) -> np.ndarray:
        if "cluster_codes" not in self._derived:
            from ..clusters import cluster_map

            kw = {"seed": self._seed, **self._derived.get("cluster_kwargs", {})}
            self._derived["cluster_codes"] = cluster_map(self.coords, **kw)
        return self._derived["cluster_codes"]

    def _derived_values(self, name: str) -> np.ndarray:
        key: Any = name if name != "neighbor_change" else (name, self._mode, self._k)
        if key not in self._derived:
            if name == "commentativeness":
                from ..evaluate import commentativeness

                e = self.embeddings
                out = commentativeness(e.image, e.text, e.image_keys)
                self._derived[key] = as_float_column(out, self._table, name)
            else:
                from ..compare import neighbor_change

                a, b = self._views[0].index, self._views[1].index
                self._derived[key] = neighbor_change(a, b, self._mode, self._k)
        return self._derived[key]


def default_color(table: pl.DataFrame) -> str:
    """The column the map is colored by at first: caption kind, else language, when it varies; else none."""
    for name in ("caption_kind", "lang"):
        if name in table.columns and table[name].n_unique() > 1:
            return name
    return NO_COLOR


def _small_values(t: pl.DataFrame, col: str, limit: int = 12) -> list[str]:
    if col not in t.columns:
        return []
    vals = t[col].drop_nulls().cast(pl.String).unique().to_list()
    return sorted(vals, key=category_key) if 1 < len(vals) <= limit else []
