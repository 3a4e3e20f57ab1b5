"""The Explorer's state, without any widget: what is open, listed, selected, filtered and colored.

:class:`ExplorerState` is plain Python (numpy, polars, the backend); it never imports ipywidgets or plotly, so a
script or a test drives it with no Jupyter at all::

    st = ExplorerState(embeddings, model=model)
    st.set_filter(caption_kind="commentative", lang="uk").click("p0001")
    st.neighbors                      # the image's nearest commentative Ukrainian texts
    st.set_map_filter("split", ["test"]).select(range(100)).selection   # only test posts stay selected
    st.same_image_posts()             # the other posts of the open post's image (the card lists them)

Every change goes through one update path, :meth:`ExplorerState._update`: it stores the new values, recomputes
what depends on them (neighbors, search results, the filter mask, colors) and then tells the listeners which
parts changed: first the views registered with :meth:`on_change`, then the user's :meth:`on_click` and
:meth:`on_select` callbacks. Setters return ``self`` so calls chain. The computing is the backend's:
:class:`~ccclip_widgets.neighbors.NeighborIndex` (neighbors, filtered in the search), :mod:`~ccclip_widgets.
projection` (the maps), :mod:`~ccclip_widgets.clusters` (clusters and their words), :mod:`~ccclip_widgets.compare`
(what changed between two models) and :mod:`~ccclip_widgets.evaluate` (commentativeness). This module holds the
state and its update path; filters, derived columns and colors are in :mod:`._explorer_filters`, the neighbor and
search lists, the posts sharing an image (and posts resolved to rows) in :mod:`._explorer_lists`, the building of
indexes and maps in :mod:`._explorer_build`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from ._colors import ColorSpec
from ._common import register_callback
from ._explorer_build import LogProgress, MapData, build_maps, load_and_embed
from ._explorer_filters import DERIVED_COLUMNS, FiltersAndColors, default_color
from ._explorer_lists import ListsAndRows

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..neighbors import NeighborIndex
    from ..posts import Posts

log = logging.getLogger(__name__)

__all__ = ["DERIVED_COLUMNS", "MODES", "ExplorerState", "MapData"]

Mode = Literal["image_to_texts", "text_to_images", "image_to_images", "text_to_texts"]

#: Neighbor modes, with the label shown in the mode menu.
MODES: dict[str, str] = {
    "image_to_texts": "image \u2192 texts",
    "text_to_images": "text \u2192 images",
    "image_to_images": "image \u2192 images",
    "text_to_texts": "text \u2192 texts",
}


class ExplorerState(ListsAndRows, FiltersAndColors):
    """State of an Explorer: current post, neighbors, filters, selection, search, colors and clusters.

    Parameters are those of :class:`ccclip_widgets.widgets.Explorer` that concern data rather than display:
    ``embeddings``, ``compare``, ``model``, ``compare_model``, ``labels``, ``index``, ``compare_index``,
    ``coords``, ``compare_coords``, ``projection``, ``projection_kwargs``, ``color``, ``mode``, ``k``, ``seed``,
    ``cache`` and ``show_progress``; ``progress`` is an object with a ``phase(text)`` context manager (and a
    ``done()`` method) that hears about the slow steps (default: log lines).
    """

    def __init__(
        self,
        embeddings: Embeddings,
        *,
        compare: Embeddings | None = None,
        model: ClipModel | None = None,
        compare_model: ClipModel | None = None,
        labels: tuple[str, str] | list[str] | None = None,
        index: NeighborIndex | None = None,
        compare_index: NeighborIndex | None = None,
        coords: Any = None,
        compare_coords: Any = None,
        projection: Literal["image", "text"] = "image",
        projection_kwargs: dict[str, Any] | None = None,
        color: str = "auto",
        mode: Mode = "image_to_texts",
        k: int = 10,
        seed: int = 0,
        cache: bool = True,
        show_progress: bool = True,
        progress: Any = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if projection not in ("image", "text"):
            raise ValueError(f"projection must be 'image' or 'text', got {projection!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.embeddings = embeddings
        self.compare_embeddings = compare
        self._table: pl.DataFrame = embeddings.posts.table
        self._n = self._table.height
        if self._n == 0:
            raise ValueError("the embeddings hold no posts")
        if embeddings.image.shape[0] != self._n or embeddings.text.shape[0] != self._n:
            raise ValueError("embeddings.image / embeddings.text do not match the posts table")
        self._projection = projection
        self._projection_kwargs = dict(projection_kwargs or {})
        self._seed = int(seed)
        self._cache = bool(cache)
        self._show_progress = show_progress
        self._progress = progress if progress is not None else LogProgress()

        self._views: list[MapData] = build_maps(
            embeddings,
            compare=compare,
            model=model,
            compare_model=compare_model,
            labels=labels,
            index=index,
            compare_index=compare_index,
            coords=coords,
            compare_coords=compare_coords,
            projection=projection,
            projection_kwargs=projection_kwargs,
            cache=cache,
            show_progress=show_progress,
            progress=self._progress,
        )
        self._mode: str = mode
        self._k = int(k)
        self._current: int | None = None
        self._hover: int | None = None
        self._selection = np.zeros(0, np.int64)
        self._query: str | None = None
        self._neighbor_filter: dict[str, list[str]] = {}
        self._map_filter: dict[str, Any] = {}
        self._visible: np.ndarray | None = None  # bool mask of posts passing the map filter; None = all
        self._show_clusters = False
        self._rank_changes: pl.DataFrame | None = None
        self._derived: dict[Any, Any] = {}
        self._callbacks: dict[str, list[Callable[..., Any]]] = {"click": [], "select": [], "change": []}
        self._color = self._make_color(default_color(self._table) if color == "auto" else color)
        self._progress.done()

    # ============================================================================== construction
    @classmethod
    def from_posts(
        cls,
        posts: Posts | str | Any,
        model: str | ClipModel = "demo",
        *,
        compare_model: str | ClipModel | None = None,
        store: Any = None,
        image_root: Any = None,
        device: str | None = None,
        allow_random: bool = False,
        show_progress: bool = True,
        progress: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Load posts and model(s), embed the posts and open an Explorer on them.

        ``posts`` is a :class:`~ccclip_widgets.posts.Posts`, a path or a list of records; ``model`` and
        ``compare_model`` are specs for :func:`ccclip_widgets.load_model` or loaded models; ``store`` is the
        embedding store; ``**kwargs`` go to the constructor.
        """
        progress = progress if progress is not None else cls._default_progress(show_progress)
        emb, m, cemb, cm = load_and_embed(
            posts,
            model,
            compare_model=compare_model,
            store=store,
            image_root=image_root,
            device=device,
            allow_random=allow_random,
            show_progress=show_progress,
            progress=progress,
        )
        return cls(
            emb,
            model=m,
            compare=cemb,
            compare_model=cm,
            show_progress=show_progress,
            progress=progress,
            **kwargs,
        )

    @classmethod
    def _default_progress(cls, show_progress: bool) -> Any:
        return LogProgress()

    # ============================================================================== read-only state
    @property
    def n(self) -> int:
        """Number of posts."""
        return self._n

    @property
    def posts(self) -> pl.DataFrame:
        """The posts table (one row per point)."""
        return self._table

    @property
    def maps(self) -> list[MapData]:
        """One :class:`MapData` per model (label, index, coordinates, model, current lists)."""
        return list(self._views)

    @property
    def mode(self) -> str:
        """Current neighbor mode (a key of :data:`MODES`)."""
        return self._mode

    @property
    def k(self) -> int:
        """Neighbors listed per click and results per search."""
        return self._k

    @property
    def coords(self) -> np.ndarray:
        """``N x 2`` float32 coordinates of the (first) map, row-aligned with :attr:`posts`."""
        return self._views[0].coords

    @property
    def indexes(self) -> list[NeighborIndex]:
        """The neighbor index of each map."""
        return [v.index for v in self._views]

    @property
    def current_index(self) -> int | None:
        """Row number of the post last clicked, or ``None``."""
        return self._current

    @property
    def current_post_id(self) -> str | None:
        """``post_id`` of the post last clicked, or ``None``."""
        return None if self._current is None else str(self._table["post_id"][self._current])

    @property
    def current_post(self) -> dict[str, Any] | None:
        """The open post as a dict (its columns plus ``index``), or ``None``."""
        return None if self._current is None else self.post(self._current)

    @property
    def hovered_index(self) -> int | None:
        """Row number of the post last hovered, or ``None``."""
        return self._hover

    @property
    def neighbors(self) -> pl.DataFrame | None:
        """Neighbors of the current post under the first model (filtered by :attr:`neighbor_filter`).

        Columns ``rank``, ``post_id``, ``score``, ``index`` plus ``text``; with a second model also ``changed``
        (the other model does not list it) and ``rank_other`` (its rank under the other model).
        """
        return self._views[0].neighbors

    @property
    def compare_neighbors(self) -> pl.DataFrame | None:
        """Neighbors of the current post under the second model (``None`` without one)."""
        return self._views[1].neighbors if len(self._views) > 1 else None

    @property
    def rank_changes(self) -> pl.DataFrame | None:
        """With two models: the current post's neighbors under either, ranked under both (``rank_a``, ``rank_b``,
        ``change`` > 0 when it rose under the second model), from :func:`ccclip_widgets.compare.neighbor_rank_changes`.
        """
        return self._rank_changes

    @property
    def selected_indices(self) -> np.ndarray:
        """Row numbers of the selected posts (sorted, int64; only posts that pass the map filter)."""
        return self._selection.copy()

    @property
    def selection(self) -> pl.DataFrame:
        """The selected posts: their rows of :attr:`posts` with the map coordinates ``x``, ``y`` appended."""
        rows = self._selection
        xy = self._views[0].coords[rows]
        return self._table[rows].with_columns(
            pl.Series("x", xy[:, 0], dtype=pl.Float32), pl.Series("y", xy[:, 1], dtype=pl.Float32)
        )

    @property
    def search_query(self) -> str | None:
        """The last free-text query (``None`` when cleared)."""
        return self._query

    @property
    def search_results(self) -> pl.DataFrame | None:
        """Top images for the last query under the first model (``rank``, ``post_id``, ``score``, ``index``, ``text``)."""
        return self._views[0].search

    @property
    def compare_search_results(self) -> pl.DataFrame | None:
        """Top images for the last query under the second model (``None`` without one or without its model)."""
        return self._views[1].search if len(self._views) > 1 else None

    @property
    def can_search(self) -> bool:
        """Whether a model was given, so free-text queries can be encoded."""
        return any(v.model is not None for v in self._views)

    @property
    def color(self) -> ColorSpec:
        """The current coloring: column, kind, per-post codes or values, categories."""
        return self._color

    @property
    def color_column(self) -> str:
        """Column the points are colored by (``"none"`` for a single color)."""
        return self._color.column

    @property
    def neighbor_filter(self) -> dict[str, list[str]]:
        """The neighbor (and search) filter: column -> allowed values; empty when every post may be listed."""
        return {c: list(v) for c, v in self._neighbor_filter.items()}

    @property
    def map_filter(self) -> dict[str, Any]:
        """The map's cross-filter: column -> list of values, or ``(low, high)`` range (either end may be None)."""
        return dict(self._map_filter)

    @property
    def visible(self) -> np.ndarray | None:
        """Boolean mask of the posts that pass the map filter (``None`` when there is none): the others fade."""
        return None if self._visible is None else self._visible.copy()

    @property
    def show_clusters(self) -> bool:
        """Whether the cluster labels are drawn on the map."""
        return self._show_clusters

    # ============================================================================== actions (chainable)
    def click(self, post: int | str) -> ExplorerState:
        """Open a post (as a click on its point does): list its neighbors and fire ``on_click``."""
        row = self._row(post)
        self._update(current=row)
        if self._callbacks["click"]:
            info = self.post(row)
            for cb in list(self._callbacks["click"]):
                cb(info)
        return self

    def click_point(self, post: int | str, view: int = 0) -> ExplorerState:
        """Open the post behind a point of map ``view``, as a click on the map does.

        Where several posts of one image share the point, the one :meth:`point_post` picks (it fits the filters
        and the color); the card then lists the others (:meth:`same_image_posts`). Otherwise ``post`` itself.
        """
        return self.click(self.point_post(post, view))

    def close_post(self) -> ExplorerState:
        """Close the open post (no card, no neighbor lists)."""
        return self._set(current=None)

    def hover(self, post: int | str) -> ExplorerState:
        """Note the hovered post (the view shows its thumbnail and text)."""
        return self._set(hover=self._row(post))

    def select(self, posts: Iterable[int | str] | np.ndarray | None, *, source: Any = None) -> ExplorerState:
        """Select posts (as a lasso or box selection does) and fire ``on_select``.

        Posts hidden by the map filter are left out. ``None`` or empty clears the selection.
        """
        return self._set(selection=self._rows(posts), source=source)

    def clear_selection(self) -> ExplorerState:
        """Clear the selection (as a double click on the map does)."""
        return self.select(None)

    def set_mode(self, mode: Mode) -> ExplorerState:
        """Change the neighbor mode (``image_to_texts``, ``text_to_images``, ``image_to_images``, ``text_to_texts``)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        return self._set(mode=mode)

    def set_k(self, k: int) -> ExplorerState:
        """Change how many neighbors (and search results) are listed."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._set(k=int(k))

    def set_color(self, column: str) -> ExplorerState:
        """Color the points by a column of the posts or a derived score (see :attr:`color_options`)."""
        return self._set(color=self._make_color(column))

    def search(self, query: str, k: int | None = None) -> ExplorerState:
        """Encode a free-text query with the model(s) and list the top images (filtered like the neighbors).

        Raises ``RuntimeError`` when no model was given.
        """
        if not self.can_search:
            raise RuntimeError(
                "free-text search needs the model that made the embeddings: Explorer(embeddings, model=model)"
            )
        if k is not None and int(k) != self._k:
            return self._set(query=str(query), k=int(k))
        return self._set(query=str(query))

    def clear_search(self) -> ExplorerState:
        """Forget the last query and its results."""
        return self._set(query=None)

    def set_filter(self, where: Mapping[str, Any] | None = None, /, **columns: Any) -> ExplorerState:
        """Restrict neighbors and search results to posts with these values (all conditions must hold).

        ``set_filter(caption_kind="commentative", lang="uk")`` lists, for an image, its nearest commentative
        Ukrainian texts; a value may be a list (``lang=["uk", "de"]``); ``set_filter()`` lists every post again.
        Any categorical column of the posts works. The filter runs inside the neighbor search (the backend
        returns ``k`` matching posts whenever that many exist).
        """
        spec = {**dict(where or {}), **columns}
        clean: dict[str, list[str]] = {}
        for col, values in spec.items():
            if values is None:
                continue
            if col not in self._table.columns:
                raise ValueError(f"cannot filter by {col!r}: no such column ({self._table.columns})")
            vals = [values] if isinstance(values, (str, bool, int)) else list(values)
            clean[col] = [str(v) for v in vals]
        return self._set(neighbor_filter=clean)

    def set_map_filter(self, column: str, values: Any = None) -> ExplorerState:
        """Cross-filter the map by one column: posts that do not match fade and cannot be selected.

        ``values`` is a value or list of values (categorical columns), a ``(low, high)`` tuple (numbers and
        times; either end ``None`` for open), or ``None`` to drop this column's filter. Filters on several
        columns combine (all must hold). Derived columns (``commentativeness``, ``cluster``) work too.
        """
        new = dict(self._map_filter)
        if values is None:
            new.pop(column, None)
        else:
            self._column(column)  # validates the name
            if isinstance(values, tuple):
                if len(values) != 2:
                    raise ValueError(f"a range is (low, high), got {values!r}")
                new[column] = values
            else:
                vals = [values] if isinstance(values, (str, bool, int)) else list(values)
                new[column] = [str(v) for v in vals]
        return self._set(map_filter=new)

    def clear_map_filters(self) -> ExplorerState:
        """Drop every map filter."""
        return self._set(map_filter={})

    def set_cluster_labels(self, show: bool = True, **cluster_kwargs: Any) -> ExplorerState:
        """Draw (or hide) the map's clusters labelled with their characteristic words.

        ``cluster_kwargs`` (``n_clusters``, ``method``, ``min_cluster_size``) go to
        :func:`ccclip_widgets.clusters.cluster_map`; new ones recompute the clusters (and a cluster coloring).
        """
        if cluster_kwargs and cluster_kwargs != self._derived.get("cluster_kwargs", {}):
            for key in ("cluster_codes", "clusters"):
                self._derived.pop(key, None)
            self._derived["cluster_kwargs"] = dict(cluster_kwargs)
            if self._color.column == "cluster":
                self._color = self._make_color("cluster")
                self._update(color=self._color)
        if show:
            self.clusters  # noqa: B018 - compute them now, so a failure surfaces at the call
        return self._set(show_clusters=bool(show))

    def on_click(self, callback: Callable[[dict[str, Any]], Any], remove: bool = False) -> ExplorerState:
        """Register (``remove=True``: unregister) ``callback(post: dict)``, called after each click."""
        register_callback(self._callbacks["click"], callback, remove)
        return self

    def on_select(self, callback: Callable[[pl.DataFrame], Any], remove: bool = False) -> ExplorerState:
        """Register (``remove=True``: unregister) ``callback(selection: polars.DataFrame)``."""
        register_callback(self._callbacks["select"], callback, remove)
        return self

    def on_change(
        self, callback: Callable[[frozenset[str], Any], Any], remove: bool = False
    ) -> ExplorerState:
        """Register ``callback(parts, source)``, called after every update with the names of the changed parts.

        Parts: ``current``, ``neighbors``, ``search``, ``selection``, ``mode``, ``k``, ``color``,
        ``neighbor_filter``, ``map_filter``, ``show_clusters``, ``hover``. ``source`` is what the caller of the
        update passed (a view passes itself, so it need not redraw what the browser already shows).
        """
        register_callback(self._callbacks["change"], callback, remove)
        return self

    # ============================================================================== the update path
    def _set(self, source: Any = None, **changes: Any) -> ExplorerState:
        """:meth:`_update`, returning ``self`` for the chainable setters."""
        self._update(source, **changes)
        return self

    def _update(self, source: Any = None, **changes: Any) -> frozenset[str]:
        """Store ``changes``, recompute what depends on them, then notify views and callbacks, in that order."""
        parts: set[str] = set()
        for name, value in changes.items():
            old = getattr(self, f"_{name}")
            if name in ("current", "query", "color"):
                same = False  # re-clicking a post or re-running a query refreshes it
            elif isinstance(value, np.ndarray):
                same = np.array_equal(old, value)
            else:
                same = old is value or old == value
            if not same:
                setattr(self, f"_{name}", value)
                parts.add(name)
        if "map_filter" in parts:
            self._visible = self._map_mask()
        if self._visible is not None and parts & {"map_filter", "selection"}:
            kept = self._selection[self._visible[self._selection]]
            if len(kept) != len(self._selection):
                self._selection = kept
                parts.add("selection")
        if self._current is not None and parts & {"current", "mode", "k", "neighbor_filter"}:
            self._refresh_neighbors()
            parts.add("neighbors")
        elif "current" in parts:  # closed
            for v in self._views:
                v.neighbors = None
            self._rank_changes = None
            parts.add("neighbors")
        if parts & {"query", "k", "neighbor_filter"} and (self._query is not None or "query" in parts):
            self._refresh_search()
            parts.add("search")
        if self._color.column == "neighbor_change" and parts & {"mode", "k"}:
            self._color = self._make_color("neighbor_change")
            parts.add("color")
        frozen = frozenset(parts)
        for cb in list(self._callbacks["change"]):
            cb(frozen, source)
        if "selection" in parts and self._callbacks["select"]:
            frame = self.selection
            for cb in list(self._callbacks["select"]):
                cb(frame)
        return frozen
