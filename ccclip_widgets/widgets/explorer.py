"""The Explorer: a map of posts where a click shows which texts fit an image and which images fit a text.

:class:`Explorer` is a plain Python object that holds the state (current post, neighbors, selection, color column,
search results) and builds its ipywidgets only when it is displayed. Everything it computes comes from the backend:
the :class:`~ccclip_widgets.neighbors.NeighborIndex` answers neighbor and search queries, the projection module lays
out the map, the evaluation module scores commentativeness. The widget only wires events to those calls.

The map is a plotly ``FigureWidget`` with one ``Scattergl`` trace of posts. Coordinates go to the browser as
float32 numpy arrays and colors as int32 category codes or float32 values, which plotly sends as binary buffers
(int64 arrays and Python lists would be sent as JSON). Per-point hover texts are only sent for small maps; above
``hover_text_limit`` the hover label names the row and the side panel shows the text and thumbnail of the hovered
post, made on demand. Above ``max_points`` a seeded random sample is drawn over a density image of all posts.

Driving it from code, as the browser does::

    ex = Explorer(embeddings, model=model)
    ex.click("p0001")            # what a click on that point does
    ex.neighbors                 # polars frame shown in the neighbor panel
    ex.set_mode("text_to_images").select([1, 2, 3]).search("a red circle")
    ex.selection                 # polars frame of the selected posts

The plotly callbacks on the map's trace (``on_click``, ``on_hover``, ``on_selection``, ``on_deselect``) call these
same methods, which is how the browser drives them.

DOM hooks for browser tests (CSS classes on the widgets):

* ``ccclip-explorer`` (root), ``ccclip-toolbar``, ``ccclip-color``, ``ccclip-mode``, ``ccclip-k``, ``ccclip-status``;
* ``ccclip-map``: the plotly graph div itself (``.ccclip-map .main-svg``, ``.ccclip-map canvas.gl-canvas-context``);
  the posts trace is named ``posts``, the highlight traces ``current``, ``neighbors`` and ``search``;
* ``ccclip-side``, ``ccclip-hover`` (``.ccclip-hover-body[data-post-id]``), ``ccclip-card``
  (``.ccclip-card-body[data-post-id]``);
* ``ccclip-neighbors`` and ``ccclip-search-results``, each holding rows ``ccclip-neighbor`` (plus ``ccclip-changed``
  when the other model does not list that neighbor) made of a thumbnail, a ``ccclip-neighbor-button`` reading
  ``"<rank>. <post_id>"`` and a ``.ccclip-neighbor-text`` element with ``data-post-id``, ``data-rank`` and
  ``data-query`` (the post or query the list answers). The lists are updated before the card, so once the card
  shows a post the lists belong to it;
* ``ccclip-search`` (the box), ``ccclip-search-input``, ``ccclip-search-button``, ``ccclip-search-note``.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from ._common import (
    INTERNAL_COLUMNS,
    ThumbnailCache,
    escape,
    post_card_html,
    preload_plotly,
    register_callback,
    require_plotly,
    require_widgets,
    truncate,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..neighbors import NeighborIndex
    from ..posts import Posts

log = logging.getLogger(__name__)

__all__ = ["DERIVED_COLUMNS", "MODES", "Explorer"]

if "ipykernel" in sys.modules:  # in a notebook, plotly's slow first import overlaps the cells before the map
    preload_plotly()

Mode = Literal["image_to_texts", "text_to_images", "image_to_images", "text_to_texts"]

#: Neighbor modes, with the label shown in the mode menu.
MODES: dict[str, str] = {
    "image_to_texts": "image \u2192 texts",
    "text_to_images": "text \u2192 images",
    "image_to_images": "image \u2192 images",
    "text_to_texts": "text \u2192 texts",
}

#: Color columns the Explorer computes on demand (through the backend), not read from the posts table.
DERIVED_COLUMNS: dict[str, str] = {
    "cluster": "k-means cluster of the mapped vectors",
    "commentativeness": "how poorly the post's own text matches its image (evaluate.commentativeness)",
    "neighbor_change": "share of a post's neighbors (current mode) that differ between the two models",
}

_MODALITIES: dict[str, tuple[str, str]] = {
    "image_to_texts": ("image", "text"),
    "text_to_images": ("text", "image"),
    "image_to_images": ("image", "image"),
    "text_to_texts": ("text", "text"),
}

#: Qualitative palette for category codes (the last color is reserved for "other").
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5",
    "#dbdb8d", "#c7c7c7",
)  # fmt: skip
_OTHER = "(other)"
_MISSING = "(missing)"
_NO_COLOR = "none"
_SINGLE_COLOR = "#1f77b4"
_CONTINUOUS_SCALE = "Viridis"
_OVERLAY_STYLE: dict[str, dict[str, Any]] = {
    "search": {"symbol": "square-open", "size": 13, "color": "#2ca02c", "line": {"width": 2.5}},
    "neighbors": {"symbol": "circle-open", "size": 13, "color": "#ff7f0e", "line": {"width": 2.5}},
    "current": {"symbol": "circle-open", "size": 20, "color": "#d62728", "line": {"width": 3.5}},
}
_CHANGED_COLOR = "#9467bd"


@dataclass
class _Color:
    """Per-post color values for the current color column (``values`` is indexed by row)."""

    column: str
    kind: Literal["none", "categorical", "continuous"]
    values: np.ndarray | None = None  # int32 codes or float32 values, length N
    categories: list[str] = field(default_factory=list)


@dataclass
class _View:
    """One model's map: its index, layout, optional model for search, and (once built) its figure."""

    label: str
    index: NeighborIndex
    coords: np.ndarray  # N x 2 float32, row-aligned with the primary posts
    model: ClipModel | None
    fig: Any = None
    main: Any = None  # the posts trace
    overlays: dict[str, Any] = field(default_factory=dict)
    neighbors: pl.DataFrame | None = None
    search: pl.DataFrame | None = None


class Explorer:
    """An interactive map of posts with click-through neighbors, selection, coloring and free-text search.

    Parameters
    ----------
    embeddings
        Image and text vectors of the posts (from :func:`ccclip_widgets.embed_posts`).
    compare
        Optional second :class:`~ccclip_widgets.embed.Embeddings` of the same posts (for example from the
        fine-tuned model): the maps are shown side by side with linked selection, and neighbors that differ
        between the two models are marked.
    model, compare_model
        Models that made ``embeddings`` / ``compare``; needed only for the free-text search box.
    labels
        Titles of the two maps (default: the models' specs).
    index, compare_index
        Prebuilt :class:`~ccclip_widgets.neighbors.NeighborIndex` objects (row-aligned with the posts); built
        from the vectors when not given.
    coords, compare_coords
        Precomputed ``N x 2`` map coordinates (row-aligned with ``embeddings``; a polars frame with ``post_id``,
        ``x``, ``y`` is matched by post id), used as given. Otherwise the backend projects the posts (UMAP on the
        index's kNN graph) and the second map starts from the first and is aligned to it point for point.
    projection
        Which vectors place the posts on the map: ``"image"`` or ``"text"``.
    projection_kwargs
        Extra arguments for :func:`ccclip_widgets.projection.project_posts` (``n_neighbors``, ``min_dist``,
        ``n_epochs``, ``seed``, ...).
    color
        Initial color column; ``"auto"`` picks ``caption_kind``, else ``lang``, else none.
    mode
        Initial neighbor mode, one of :data:`MODES`.
    k
        Neighbors listed per click and results per search.
    max_points
        Draw at most this many points; above it a seeded random sample is drawn over a density image of all
        posts (a box or lasso still selects every post inside it). At 1M drawn points headless Chromium took
        9 s to draw the map in JupyterLab on the 2-core machine, against 3 s at 100k
        (``benchmarks/bench_explorer_render.py``).
    hover_text_limit
        Send per-point hover texts only when at most this many points are drawn.
    density
        ``"auto"`` draws the density image only when sampling; ``True``/``False`` force it on/off.
    height
        Height of each map in pixels.
    map_width
        Width of each map in pixels (default 640 for one map, 540 each for two). With two maps the side panel
        goes below them.
    thumbnail_size, card_image_size
        Pixel sizes of list thumbnails and of the card image.
    seed
        Seed for the point sample and the clusters.
    cache
        Cache computed layouts on disk (under the toolkit cache folder), keyed by embedding fingerprint and
        parameters, so reopening the same posts skips UMAP.
    show_progress
        Show progress bars while building the index and the layout.

    Notes
    -----
    Callbacks registered with :meth:`on_click` receive the clicked post as a ``dict`` (its columns plus
    ``index``, the row number); those registered with :meth:`on_select` receive :attr:`selection`.
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
        max_points: int = 200_000,
        hover_text_limit: int = 50_000,
        density: bool | Literal["auto"] = "auto",
        height: int = 560,
        map_width: int | None = None,
        thumbnail_size: int = 56,
        card_image_size: int = 224,
        seed: int = 0,
        cache: bool = True,
        show_progress: bool = True,
    ) -> None:
        preload_plotly()  # overlap plotly's slow first import with the backend work below
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if projection not in ("image", "text"):
            raise ValueError(f"projection must be 'image' or 'text', got {projection!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self.embeddings = embeddings
        self.compare_embeddings = compare
        self._table: pl.DataFrame = embeddings.posts.table
        self._n = self._table.height
        if self._n == 0:
            raise ValueError("the embeddings hold no posts")
        if embeddings.image.shape[0] != self._n or embeddings.text.shape[0] != self._n:
            raise ValueError("embeddings.image / embeddings.text do not match the posts table")
        self._mode: str = mode
        self._k = int(k)
        self._projection = projection
        self._projection_kwargs = dict(projection_kwargs or {})
        self._max_points = int(max_points)
        self._hover_text_limit = int(hover_text_limit)
        self._density = density
        self._height = int(height)
        self._map_width = int(map_width) if map_width else (640 if compare is None else 540)
        self._thumb_size = int(thumbnail_size)
        self._card_size = int(card_image_size)
        self._seed = int(seed)
        self._cache = bool(cache)
        self._show_progress = show_progress
        self._thumbs = ThumbnailCache()

        lab = list(labels) if labels is not None else [embeddings.model_spec or "model", ""]
        if compare is not None and (labels is None or len(lab) < 2 or not lab[1]):
            lab = [lab[0], compare.model_spec or "compare"]
            if lab[0] == lab[1]:
                lab = [f"{lab[0]} (A)", f"{lab[1]} (B)"]
        _check_model(model, embeddings, "model")

        base = _View(
            label=str(lab[0]),
            index=index if index is not None else self._build_index(embeddings.image, embeddings.text),
            coords=np.zeros((0, 2), np.float32),
            model=model,
        )
        _check_index(base.index, self._table, "index")
        base.coords = self._layout(base.index, coords, embeddings.fingerprint, reference=None)
        self._views: list[_View] = [base]
        if compare is not None:
            _check_model(compare_model, compare, "compare_model")
            perm = _alignment(self._table, compare.posts.table)
            img = compare.image if perm is None else compare.image[perm]
            txt = compare.text if perm is None else compare.text[perm]
            other = _View(
                label=str(lab[1]),
                index=compare_index if compare_index is not None else self._build_index(img, txt),
                coords=np.zeros((0, 2), np.float32),
                model=compare_model,
            )
            _check_index(other.index, self._table, "compare_index")
            other.coords = self._layout(
                other.index, compare_coords, compare.fingerprint, reference=base.coords
            )
            self._views.append(other)
        elif compare_model is not None or compare_index is not None or compare_coords is not None:
            raise ValueError("compare_model, compare_index and compare_coords need compare=Embeddings")

        # points drawn: all rows, or a seeded sample above max_points
        self._shown: np.ndarray | None = None  # int32 rows drawn, None = all (point index == row)
        self._pos_of: np.ndarray | None = None  # int32 row -> point index, -1 when not drawn
        if self._n > self._max_points:
            rng = np.random.default_rng(self._seed)
            shown = np.sort(rng.choice(self._n, self._max_points, replace=False)).astype(np.int32)
            self._shown = shown
            pos = np.full(self._n, -1, np.int32)
            pos[shown] = np.arange(len(shown), dtype=np.int32)
            self._pos_of = pos

        self._current: int | None = None
        self._card = ""
        self._hover: int | None = None
        self._hover_html = ""
        self._selection = np.zeros(0, np.int64)
        self._query: str | None = None
        self._callbacks: dict[str, list[Callable[..., Any]]] = {"click": [], "select": []}
        self._derived: dict[Any, np.ndarray] = {}
        self._ui: dict[str, Any] | None = None
        self.last_error: BaseException | None = None
        self._color = self._make_color(_default_color(self._table) if color == "auto" else color)

    # ================================================================================ construction helpers
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
        **kwargs: Any,
    ) -> Explorer:
        """Load posts and model(s), embed the posts and open an Explorer on them.

        Parameters
        ----------
        posts
            A :class:`~ccclip_widgets.posts.Posts`, a path to a posts file, or a list of post records.
        model
            A model spec for :func:`ccclip_widgets.load_model` (``"demo"``, ``"ViT-B-32:laion2b_s34b_b79k"``,
            a checkpoint folder, ...) or a loaded :class:`~ccclip_widgets.models.ClipModel`.
        compare_model
            Optional second model (for example a fine-tuned checkpoint) for side-by-side maps.
        store
            Embedding store for :func:`ccclip_widgets.embed_posts` (reused across runs).
        image_root
            Folder of relative image paths when ``posts`` is a path or records.
        device
            Device for models loaded from specs.
        allow_random
            Passed to :func:`ccclip_widgets.load_model` (random weights on purpose, for tests).
        show_progress
            Progress bars for embedding, index and layout.
        **kwargs
            Passed to :class:`Explorer`.

        Returns
        -------
        Explorer
        """
        from ..embed import embed_posts
        from ..models import load_model
        from ..posts import Posts, posts_from_records, read_posts

        preload_plotly()
        if isinstance(posts, Posts):
            p = posts
        elif isinstance(posts, (list, tuple)):
            p = posts_from_records(list(posts), image_root=image_root)
        else:
            p = read_posts(posts, image_root=image_root)

        def load(spec: Any) -> ClipModel:
            if isinstance(spec, str):
                return load_model(spec, device=device, allow_random=allow_random)
            return spec

        m = load(model)
        emb = embed_posts(p, m, store=store, show_progress=show_progress)
        cm, cemb = None, None
        if compare_model is not None:
            cm = load(compare_model)
            cemb = embed_posts(p, cm, store=store, show_progress=show_progress)
        return cls(emb, model=m, compare=cemb, compare_model=cm, show_progress=show_progress, **kwargs)

    def _build_index(self, image: np.ndarray, text: np.ndarray) -> NeighborIndex:
        from ..neighbors import NeighborIndex

        return NeighborIndex.build(
            self._table["post_id"].to_list(),
            image,
            text,
            image_keys=self._table["image_key"].to_numpy(),
            show_progress=self._show_progress,
        )

    def _layout(
        self, index: NeighborIndex, coords: Any, fingerprint: str, reference: np.ndarray | None
    ) -> np.ndarray:
        """Map coordinates: given ones (checked and cast), else the backend's UMAP on the index's kNN graph.

        The second map (``reference`` given) starts from the first map's layout and is Procrustes-aligned onto
        it. Both are cached on disk by embedding fingerprint and parameters (``cache=False`` turns that off).
        """
        if coords is not None:
            return _coerce_coords(coords, self._table)
        from .. import projection

        kw = dict(self._projection_kwargs)
        n_neighbors = int(kw.pop("n_neighbors", 15))
        cache_dir = None
        if self._cache:
            from .._io import default_cache_dir

            cache_dir = default_cache_dir() / "projections"
        if reference is None:
            xy = projection.project_posts(
                index,
                kind=self._projection,
                n_neighbors=n_neighbors,
                cache_dir=cache_dir,
                fingerprint=fingerprint if cache_dir is not None else None,
                show_progress=self._show_progress,
                **kw,
            )
            return _coerce_coords(xy, self._table)

        def compute() -> np.ndarray:
            knn = index.knn_graph(self._projection, k=n_neighbors, show_progress=self._show_progress)
            return projection.align_layout(
                reference,
                index.vectors(self._projection),
                knn=knn,
                n_neighbors=n_neighbors,
                show_progress=self._show_progress,
                **kw,
            )

        if cache_dir is None:
            return _coerce_coords(compute(), self._table)
        params = {
            "kind": self._projection,
            "n_neighbors": n_neighbors,
            "aligned_to": {"array_blake2b": _array_hash(reference)},
            "align": "refine-v2",  # bump when align_layout's defaults change
            **kw,
        }
        return _coerce_coords(
            projection.cached_projection(cache_dir, fingerprint, params, compute), self._table
        )

    # ================================================================================ public state
    @property
    def n(self) -> int:
        """Number of posts."""
        return self._n

    @property
    def posts(self) -> pl.DataFrame:
        """The posts table (one row per point)."""
        return self._table

    @property
    def mode(self) -> str:
        """Current neighbor mode (a key of :data:`MODES`)."""
        return self._mode

    @property
    def k(self) -> int:
        """Neighbors listed per click and results per search."""
        return self._k

    @property
    def color_column(self) -> str:
        """Column the points are colored by (``"none"`` for a single color)."""
        return self._color.column

    @property
    def color_options(self) -> list[str]:
        """Columns the map can be colored by: known columns, derived scores, then metadata."""
        t = self._table
        opts = [_NO_COLOR] + [c for c in ("caption_kind", "lang", "split") if c in t.columns]
        opts += ["cluster", "commentativeness"] + (["neighbor_change"] if len(self._views) > 1 else [])
        for name, dtype in t.schema.items():
            if name in INTERNAL_COLUMNS or name in opts or name in DERIVED_COLUMNS:
                continue
            if dtype.is_numeric() or dtype.is_temporal() or dtype in (pl.String, pl.Boolean, pl.Categorical):
                opts.append(name)
        return opts

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
    def neighbors(self) -> pl.DataFrame | None:
        """Neighbors of the current post under the first model, as shown in the panel.

        Columns ``rank``, ``post_id``, ``score``, ``index`` (from the index) plus ``text``; with a second model,
        ``changed`` marks neighbors that the other model does not list.
        """
        return self._views[0].neighbors

    @property
    def compare_neighbors(self) -> pl.DataFrame | None:
        """Neighbors of the current post under the second model (``None`` without one)."""
        return self._views[1].neighbors if len(self._views) > 1 else None

    @property
    def card(self) -> str:
        """HTML of the post card shown for the current post (empty before a click)."""
        return self._card

    @property
    def hover_html(self) -> str:
        """HTML of the hover preview (thumbnail and text of the hovered post)."""
        return self._hover_html

    @property
    def selected_indices(self) -> np.ndarray:
        """Row numbers of the selected posts (sorted, int64)."""
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
        """The last free-text query."""
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
    def n_drawn(self) -> int:
        """Number of points drawn on each map (all posts unless above ``max_points``)."""
        return self._n if self._shown is None else len(self._shown)

    def __repr__(self) -> str:
        labels = " | ".join(v.label for v in self._views)
        return (
            f"Explorer({self._n} posts, drawn={self.n_drawn}, maps=[{labels}], mode={self._mode!r}, "
            f"color={self._color.column!r}, current={self.current_post_id!r}, selected={len(self._selection)})"
        )

    # ================================================================================ actions (chainable)
    def click(self, post: int | str) -> Explorer:
        """Open a post: fill the card and the neighbor list(s), highlight it on the map(s), fire ``on_click``.

        This is what a click on a point (or on a neighbor or search result) calls.

        Parameters
        ----------
        post
            Row number or ``post_id``.

        Returns
        -------
        Explorer
            ``self``.
        """
        row = self._row(post)
        self._current = row
        self._update_neighbors()
        self._card = self._make_card(row)
        self._render_post()
        if self._callbacks["click"]:
            info = self._post_dict(row)
            for cb in list(self._callbacks["click"]):
                cb(info)
        return self

    def hover(self, post: int | str) -> Explorer:
        """Show a post's thumbnail and text in the hover panel (only that one thumbnail is made).

        Parameters
        ----------
        post
            Row number or ``post_id``.
        """
        row = self._row(post)
        self._hover = row
        p = self._post_dict(row)
        img = self._thumbs.img_html(p, 2 * self._thumb_size)
        self._hover_html = (
            f'<div class="ccclip-hover-body" data-post-id="{escape(p["post_id"])}" '
            f'style="display:flex;gap:8px;align-items:flex-start">{img}<div style="min-width:0">'
            f'<div style="font-family:monospace">{escape(p["post_id"])}</div>'
            f"<div>{escape(truncate(p.get('text'), 280))}</div></div></div>"
        )
        if self._ui is not None:
            self._ui["hover"].value = self._hover_html
        return self

    def select(self, posts: Iterable[int | str] | np.ndarray | None) -> Explorer:
        """Select posts (as a lasso or box selection does) and fire ``on_select``.

        Parameters
        ----------
        posts
            Row numbers or ``post_id`` values; ``None`` or empty clears the selection.

        Returns
        -------
        Explorer
            ``self``.
        """
        self._set_selection(self._rows(posts), source=None)
        return self

    def clear_selection(self) -> Explorer:
        """Clear the selection (as a double click on the map does)."""
        self._set_selection(np.zeros(0, np.int64), source=None)
        return self

    def set_mode(self, mode: Mode) -> Explorer:
        """Change the neighbor mode; the current post's neighbors are queried again.

        Parameters
        ----------
        mode
            ``"image_to_texts"`` (texts whose words fit the post's image), ``"text_to_images"``,
            ``"image_to_images"`` or ``"text_to_texts"``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        self._mode = mode
        if self._ui is not None and self._ui["mode"].value != mode:
            self._ui["mode"].value = mode  # its observer calls back here, with nothing left to do
        if self._current is not None:
            self._update_neighbors()
            self._render_post()
        if self._color.column == "neighbor_change":
            self.set_color("neighbor_change")
        return self

    def set_k(self, k: int) -> Explorer:
        """Change how many neighbors (and search results) are listed."""
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._k = int(k)
        if self._ui is not None and self._ui["k"].value != self._k:
            self._ui["k"].value = self._k
        if self._current is not None:
            self._update_neighbors()
            self._render_post()
        if self._query is not None and self.can_search:
            self.search(self._query)
        return self

    def set_color(self, column: str) -> Explorer:
        """Color the points by a column of the posts or a derived score (see :attr:`color_options`).

        String, boolean and small-integer columns become int32 category codes with a discrete color map (the
        most frequent categories, the rest as "(other)"); other numbers become float32 on a continuous scale.
        """
        self._color = self._make_color(column)
        if self._ui is not None:
            if self._ui["color"].value != column:
                self._ui["color"].value = column
            self._render_color()
        return self

    def search(self, query: str, k: int | None = None) -> Explorer:
        """Encode a free-text query with the model(s) and list the top images (highlighted on the map).

        Parameters
        ----------
        query
            Any text.
        k
            Results to list (default: :attr:`k`).

        Raises
        ------
        RuntimeError
            When no model was given to the Explorer.
        """
        from ..embed import encode_texts

        if not self.can_search:
            raise RuntimeError(
                "free-text search needs the model that made the embeddings: Explorer(embeddings, model=model)"
            )
        query = str(query)
        kk = self._k if k is None else int(k)
        self._query = query
        for v in self._views:
            if v.model is None:
                v.search = None
                continue
            vec = encode_texts(v.model, [query])[0]
            v.search = self._with_text(v.index.query_vector(vec, target="image", k=kk))
        self._render_search()
        return self

    def on_click(self, callback: Callable[[dict[str, Any]], Any], remove: bool = False) -> Explorer:
        """Register (or with ``remove=True`` unregister) ``callback(post: dict)``, called after each click."""
        return self._register("click", callback, remove)

    def on_select(self, callback: Callable[[pl.DataFrame], Any], remove: bool = False) -> Explorer:
        """Register (or with ``remove=True`` unregister) ``callback(selection: polars.DataFrame)``."""
        return self._register("select", callback, remove)

    # ================================================================================ display
    @property
    def widget(self) -> Any:
        """The ipywidgets container (built on first access)."""
        if self._ui is None:
            self._build_ui()
        assert self._ui is not None
        return self._ui["root"]

    @property
    def figures(self) -> list[Any]:
        """The plotly ``FigureWidget`` of each map (builds the widget)."""
        self.widget  # noqa: B018
        return [v.fig for v in self._views]

    @property
    def panels(self) -> dict[str, Any]:
        """The named sub-widgets (builds the widget).

        ``root``, ``maps`` (the FigureWidgets), ``color``, ``mode``, ``k``, ``status``, ``search``,
        ``search_input``, ``search_button``, ``search_note``, ``search_results`` and ``search_lists`` (one column
        per map), ``hover``, ``card``, ``neighbors`` and ``neighbor_lists`` (one column per map).
        """
        self.widget  # noqa: B018
        assert self._ui is not None
        return dict(self._ui)

    def neighbor_rows(self, view: int = 0) -> list[Any]:
        """The row widgets of a neighbor list (``view`` 1 is the second model's list)."""
        return list(self.panels["neighbor_lists"][view].children[1:])

    def neighbor_buttons(self, view: int = 0) -> list[Any]:
        """The clickable button of each neighbor row; ``button.click()`` moves to that post."""
        return [row.children[1] for row in self.neighbor_rows(view)]

    def search_buttons(self, view: int = 0) -> list[Any]:
        """The clickable button of each search result row."""
        lists = self.panels["search_lists"]
        return [row.children[1] for row in lists[view].children[1:]]

    def show(self) -> None:
        """Display the widget in the notebook."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(include=include, exclude=exclude, **kwargs)

    # ================================================================================ internals: rows, state
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

    def _post_dict(self, row: int) -> dict[str, Any]:
        d = self._table.row(row, named=True)
        d["index"] = row
        return d

    def _with_text(self, frame: pl.DataFrame) -> pl.DataFrame:
        texts = (
            self._table["text"].gather(frame["index"]) if frame.height else pl.Series("text", [], pl.String)
        )
        return frame.with_columns(texts.alias("text"))

    def _update_neighbors(self) -> None:
        assert self._current is not None
        for v in self._views:
            query = getattr(v.index, self._mode)
            v.neighbors = self._with_text(query(self._current, self._k))
        if len(self._views) == 2:
            a, b = self._views
            assert a.neighbors is not None and b.neighbors is not None
            ida, idb = a.neighbors["post_id"], b.neighbors["post_id"]
            a.neighbors = a.neighbors.with_columns(changed=~ida.is_in(idb.implode()))
            b.neighbors = b.neighbors.with_columns(changed=~idb.is_in(ida.implode()))

    def _make_card(self, row: int) -> str:
        p = self._table.row(row, named=True)
        extra: dict[str, Any] = {}
        for name in ("commentativeness", "cluster"):
            if name in self._derived:
                extra[name] = self._derived[name][row].item()
        if len(self._views) == 2:
            a, b = (v.neighbors for v in self._views)
            assert a is not None and b is not None
            extra[f"neighbors changed ({MODES[self._mode]})"] = f"{int(a['changed'].sum())} of {a.height}"
        img = self._thumbs.img_html(p, self._card_size, css_class="ccclip-card-image")
        return post_card_html(p, image_html=img, extra=extra)

    def _register(self, event: str, callback: Callable[..., Any], remove: bool) -> Explorer:
        register_callback(self._callbacks[event], callback, remove)
        return self

    def _set_selection(self, rows: np.ndarray, source: int | None) -> None:
        self._selection = rows
        self._render_selection(source)
        if self._callbacks["select"]:
            frame = self.selection
            for cb in list(self._callbacks["select"]):
                cb(frame)

    # ================================================================================ internals: colors
    def _make_color(self, column: str) -> _Color:
        if column == _NO_COLOR or column is None:
            return _Color(_NO_COLOR, "none")
        if column not in self.color_options:
            raise ValueError(f"cannot color by {column!r}; choose one of {self.color_options}")
        if column == "cluster":
            codes = self._derived_values("cluster")
            return _Color(column, "categorical", codes, [str(i) for i in range(int(codes.max()) + 1)])
        if column in ("commentativeness", "neighbor_change"):
            return _Color(column, "continuous", self._derived_values(column))
        return _column_color(self._table[column])

    def _derived_values(self, name: str) -> np.ndarray:
        key: Any = name if name != "neighbor_change" else (name, self._mode, self._k)
        if key not in self._derived:
            if name == "cluster":
                values = _clusters(self._views[0].index.vectors(self._projection), self._seed)
            elif name == "commentativeness":
                values = self._commentativeness()
            else:
                values = self._neighbor_change()
            self._derived[key] = values
        return self._derived[key]

    def _commentativeness(self) -> np.ndarray:
        from ..evaluate import commentativeness

        e = self.embeddings
        out = commentativeness(e.image, e.text, e.image_keys)
        return _as_float_column(out, self._table, "commentativeness")

    def _neighbor_change(self) -> np.ndarray:
        """Share of each post's ``k`` neighbors (current mode) that the two models do not share."""
        src, dst = _MODALITIES[self._mode]
        k = min(self._k, self._n)
        lists = []
        for v in self._views:
            vecs = v.index.vectors(src)
            idx = np.empty((self._n, k), np.int64)
            for s in range(0, self._n, 65_536):
                idx[s : s + 65_536] = v.index.search(vecs[s : s + 65_536], target=dst, k=k)[1]
            lists.append(idx)
        a, b = lists
        shared = np.empty(self._n, np.int32)
        for s in range(0, self._n, 16_384):
            aa, bb = a[s : s + 16_384], b[s : s + 16_384]
            shared[s : s + 16_384] = (
                ((aa[:, :, None] == bb[:, None, :]) & (aa[:, :, None] >= 0)).any(2).sum(1)
            )
        return (1.0 - shared / np.float32(k)).astype(np.float32)

    def _marker(self, show_scale: bool = True) -> dict[str, Any]:
        """The posts trace's marker: size, opacity and the color arrays for the drawn points.

        ``show_scale`` draws the color bar (with two maps, only the right one shows it).
        """
        n = self.n_drawn
        size = 7 if n <= 5_000 else 5 if n <= 50_000 else 3 if n <= 300_000 else 2
        opacity = 0.85 if n <= 50_000 else 0.7 if n <= 300_000 else 0.55
        m: dict[str, Any] = {"size": size, "opacity": opacity}
        c = self._color
        if c.kind == "none" or c.values is None:
            m["color"] = _SINGLE_COLOR
            return m
        values = c.values if self._shown is None else c.values[self._shown]
        if c.kind == "categorical":
            m.update(
                color=np.ascontiguousarray(values, dtype=np.int32),
                colorscale=_stepped_scale(len(c.categories)),
                cmin=-0.5,
                cmax=len(c.categories) - 0.5,
                showscale=show_scale,
                colorbar={
                    "title": {"text": c.column},
                    "tickvals": list(range(len(c.categories))),
                    "ticktext": [truncate(x, 24) for x in c.categories],
                    "thickness": 12,
                },
            )
        else:
            finite = values[np.isfinite(values)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            m.update(
                color=np.ascontiguousarray(values, dtype=np.float32),
                colorscale=_CONTINUOUS_SCALE,
                cmin=lo,
                cmax=hi if hi > lo else lo + 1.0,
                showscale=show_scale,
                colorbar={"title": {"text": c.column}, "thickness": 12},
            )
        return m

    # ================================================================================ internals: widgets
    def _make_figure(self, go: Any, vi: int) -> Any:
        v = self._views[vi]
        rows = self._shown
        xy = v.coords if rows is None else v.coords[rows]
        x = np.ascontiguousarray(xy[:, 0], dtype=np.float32)
        y = np.ascontiguousarray(xy[:, 1], dtype=np.float32)
        traces: list[Any] = []
        if self._density is True or (self._density == "auto" and rows is not None):
            traces.append(_density_trace(go, v.coords))
        main: dict[str, Any] = {
            "x": x,
            "y": y,
            "mode": "markers",
            "name": "posts",
            "marker": self._marker(show_scale=vi == len(self._views) - 1),
            "showlegend": False,
            "selected": {"marker": {"opacity": 1.0}},
            "unselected": {"marker": {"opacity": 0.12}},
        }
        if rows is not None:
            main["customdata"] = rows  # int32 row numbers, sent as a binary buffer
        selected = self._selected_points()
        if selected is not None:
            main["selectedpoints"] = selected
        if self.n_drawn <= self._hover_text_limit:
            main["hovertext"] = _hover_texts(self._table, rows)
            main["hovertemplate"] = "%{hovertext}<extra></extra>"
        else:
            ref = "%{customdata}" if rows is not None else "%{pointNumber}"
            main["hovertemplate"] = f"post #{ref}<extra></extra>"
        traces.append(go.Scattergl(**main))
        highlighted = self._overlay_xy(v)
        for name, style in _OVERLAY_STYLE.items():
            marker = dict(style)
            if name == "neighbors":
                marker["color"] = self._neighbor_colors(v)
            traces.append(
                go.Scattergl(
                    x=highlighted[name][0],
                    y=highlighted[name][1],
                    mode="markers",
                    name=name,
                    marker=marker,
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
        fig = go.FigureWidget(
            data=traces,
            layout={
                "height": self._height,
                "width": self._map_width,
                "autosize": False,
                "margin": {"l": 8, "r": 8, "t": 34, "b": 8},
                "title": {"text": escape(v.label), "x": 0.01, "font": {"size": 13}},
                "xaxis": {"visible": False},
                "yaxis": {"visible": False},
                "dragmode": "zoom",
                "hovermode": "closest",
                "clickmode": "event",
                "uirevision": "ccclip",
                "template": "plotly_white",
                "showlegend": False,
            },
        )
        v.fig = fig
        v.main = fig.data[len(traces) - 1 - len(_OVERLAY_STYLE)]
        v.overlays = {
            name: fig.data[len(traces) - len(_OVERLAY_STYLE) + i] for i, name in enumerate(_OVERLAY_STYLE)
        }
        v.main.on_click(functools.partial(self._plotly_click, vi))
        v.main.on_hover(functools.partial(self._plotly_hover, vi))
        v.main.on_selection(functools.partial(self._plotly_selection, vi))
        v.main.on_deselect(functools.partial(self._plotly_deselect, vi))
        fig.add_class("ccclip-map")
        return fig

    def _build_ui(self) -> None:
        w = require_widgets()
        go = require_plotly()
        ui: dict[str, Any] = {}
        boxes = []
        for vi in range(len(self._views)):
            fig = self._make_figure(go, vi)
            box = w.Box(
                [fig], layout=w.Layout(width=f"{self._map_width}px", flex="0 0 auto", overflow="hidden")
            )
            boxes.append(box)
        ui["maps"] = [v.fig for v in self._views]
        maps = w.HBox(boxes, layout=w.Layout(flex="0 0 auto"))

        color = w.Dropdown(
            options=self.color_options,
            value=self._color.column,
            description="color",
            layout=w.Layout(width="240px"),
        )
        color.add_class("ccclip-color")
        color.observe(lambda ch: self._from_ui(self.set_color, ch["new"], self._color.column), names="value")
        mode = w.Dropdown(
            options=[(label, key) for key, label in MODES.items()],
            value=self._mode,
            description="neighbors",
            layout=w.Layout(width="240px"),
        )
        mode.add_class("ccclip-mode")
        mode.observe(lambda ch: self._from_ui(self.set_mode, ch["new"], self._mode), names="value")
        kbox = w.BoundedIntText(
            value=self._k, min=1, max=1000, description="k", layout=w.Layout(width="130px")
        )
        kbox.add_class("ccclip-k")
        kbox.observe(lambda ch: self._from_ui(self.set_k, ch["new"], self._k), names="value")
        status = w.HTML()
        status.add_class("ccclip-status")

        s_in = w.Text(
            placeholder="describe an image, press Enter" if self.can_search else "search needs a model",
            continuous_update=False,
            disabled=not self.can_search,
            layout=w.Layout(flex="1 1 auto", width="auto"),
        )
        s_in.add_class("ccclip-search-input")
        s_btn = w.Button(description="Search", icon="search", disabled=not self.can_search)
        s_btn.add_class("ccclip-search-button")
        s_in.observe(
            lambda ch: self._guard(self.search, ch["new"]) if ch["new"].strip() else None, names="value"
        )
        s_btn.on_click(lambda _b: self._guard(self.search, s_in.value) if s_in.value.strip() else None)
        note = w.HTML(
            ""
            if self.can_search
            else '<span class="ccclip-search-note" style="color:#777;font-size:12px">Free-text search is off: '
            "pass the model that made the embeddings, <code>Explorer(embeddings, model=model)</code>.</span>"
        )
        search = w.HBox([s_in, s_btn])
        search.add_class("ccclip-search")

        hover = w.HTML(self._hover_html)
        hover.add_class("ccclip-hover")
        card = w.HTML(self._card or _EMPTY_CARD)
        card.add_class("ccclip-card")
        neighbor_lists = [self._list_box(v.label if len(self._views) > 1 else "") for v in self._views]
        neighbors = w.HBox(neighbor_lists) if len(self._views) > 1 else w.VBox(neighbor_lists)
        neighbors.add_class("ccclip-neighbors")
        search_lists = [self._list_box(v.label if len(self._views) > 1 else "") for v in self._views]
        results = w.HBox(search_lists) if len(self._views) > 1 else w.VBox(search_lists)
        results.add_class("ccclip-search-results")

        for part in (search, note, results, hover, card, neighbors):
            part.layout.flex = "0 0 auto"  # never squash a panel: the side column scrolls instead
        single = len(self._views) == 1
        side = w.VBox(
            [search, note, results, hover, card, neighbors],
            layout=w.Layout(
                width="440px" if single else f"{2 * self._map_width}px",
                flex="0 0 auto",
                max_height=f"{self._height + 60}px" if single else None,
                overflow="auto" if single else "visible",
                padding="0 0 0 8px" if single else "8px 0 0 0",
            ),
        )
        side.add_class("ccclip-side")
        toolbar = w.HBox([color, mode, kbox, status], layout=w.Layout(align_items="center"))
        toolbar.add_class("ccclip-toolbar")
        root = w.VBox([toolbar, w.HBox([maps, side]) if single else w.VBox([maps, side])])
        root.add_class("ccclip-explorer")
        ui.update(
            root=root,
            color=color,
            mode=mode,
            k=kbox,
            status=status,
            search=search,
            search_input=s_in,
            search_button=s_btn,
            search_note=note,
            search_results=results,
            search_lists=search_lists,
            hover=hover,
            card=card,
            neighbors=neighbors,
            neighbor_lists=neighbor_lists,
        )
        self._ui = ui
        # the figures were made from the current state: fill the panels without restyling them
        self._render_post(figures=False)
        self._render_search(figures=False)

    def _list_box(self, title: str) -> Any:
        """A titled column of result rows; with two maps, the columns share the width side by side."""
        w = require_widgets()
        head = w.HTML(f"<b>{escape(title)}</b>" if title else "")
        side_by_side = len(self._views) > 1
        return w.VBox([head], layout=w.Layout(flex="1 1 0" if side_by_side else "0 0 auto", min_width="0"))

    def _new_row(self) -> Any:
        """An empty clickable row for a neighbor or search list: thumbnail, button, score and text.

        Rows are reused from click to click (only their values change), so a click sends a few state updates
        to the browser instead of creating dozens of new widgets.
        """
        w = require_widgets()
        thumb = w.HTML(layout=w.Layout(flex="0 0 auto"))
        btn = w.Button(layout=w.Layout(width="auto", min_width="96px", flex="0 0 auto"))
        btn.add_class("ccclip-neighbor-button")
        btn.target_row = None  # the row number it opens, set by _set_row
        btn.on_click(lambda b: self._guard(self.click, b.target_row) if b.target_row is not None else None)
        text = w.HTML(layout=w.Layout(flex="1 1 auto", min_width="0"))
        box = w.HBox([thumb, btn, text], layout=w.Layout(align_items="center"))
        box.add_class("ccclip-neighbor")
        return box

    def _set_row(self, box: Any, rec: dict[str, Any], changed: bool | None, query: str) -> None:
        """Show one result (``rank``, ``post_id``, ``score``, ``index``, ``text``) in a row from :meth:`_new_row`."""
        thumb, btn, text = box.children
        row = int(rec["index"])
        pid = str(rec["post_id"])
        thumb.value = self._thumbs.img_html(self._table.row(row, named=True), self._thumb_size)
        btn.description = f"{rec['rank']}. {pid}"
        btn.tooltip = truncate(rec.get("text"), 300)
        btn.target_row = row
        badge = (
            ' <span class="ccclip-changed-badge" style="color:#9467bd">\u25c6 changed</span>'
            if changed
            else ""
        )
        text.value = (
            f'<div class="ccclip-neighbor-text" data-post-id="{escape(pid)}" data-rank="{rec["rank"]}" '
            f'data-query="{escape(query)}" style="font-size:12px;line-height:1.3">'
            f'<span style="font-family:monospace">{escape(pid)}</span> \u00b7 '
            f'<span class="ccclip-score">{float(rec["score"]):.3f}</span>{badge}<br>'
            f"{escape(truncate(rec.get('text'), 160))}</div>"
        )
        if changed:
            box.add_class("ccclip-changed")
        else:
            box.remove_class("ccclip-changed")

    def _fill_list(self, box: Any, frame: pl.DataFrame | None, marks: bool, query: str) -> None:
        """Show a result frame in a list column, reusing its row widgets."""
        recs = [] if frame is None else frame.to_dicts()
        pool: list[Any] = box.row_pool if hasattr(box, "row_pool") else []
        box.row_pool = pool
        while len(pool) < len(recs):
            pool.append(self._new_row())
        for widget, rec in zip(pool, recs):
            self._set_row(widget, rec, bool(rec.get("changed")) if marks else None, query)
        box.children = [box.children[0], *pool[: len(recs)]]

    # ================================================================================ internals: rendering
    def _render_post(self, figures: bool = True) -> None:
        if self._ui is None:
            return
        # lists first, then the card: once the browser shows the new card, the lists are already new too
        for v, box in zip(self._views, self._ui["neighbor_lists"], strict=True):
            self._fill_list(box, v.neighbors, marks=len(self._views) > 1, query=self.current_post_id or "")
        self._ui["card"].value = self._card or _EMPTY_CARD
        if figures:
            self._render_overlays()
        self._render_status()

    def _render_search(self, figures: bool = True) -> None:
        if self._ui is None:
            return
        for v, box in zip(self._views, self._ui["search_lists"], strict=True):
            self._fill_list(box, v.search, marks=False, query=self._query or "")
        if figures:
            self._render_overlays()

    def _overlay_xy(self, v: _View) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """float32 x, y of the highlighted points of one map: current post, its neighbors, search results."""
        cur = np.zeros(0, np.int64) if self._current is None else np.array([self._current], np.int64)
        out = {}
        for name, rows in (
            ("current", cur),
            ("neighbors", _index_rows(v.neighbors)),
            ("search", _index_rows(v.search)),
        ):
            xy = v.coords[rows] if len(rows) else np.zeros((0, 2), np.float32)
            out[name] = (
                np.ascontiguousarray(xy[:, 0], np.float32),
                np.ascontiguousarray(xy[:, 1], np.float32),
            )
        return out

    def _neighbor_colors(self, v: _View) -> str | list[str]:
        """Ring color of each neighbor on the map: changed neighbors (second model given) stand out."""
        nb = v.neighbors
        base = _OVERLAY_STYLE["neighbors"]["color"]
        if nb is None or "changed" not in nb.columns or nb.height == 0:
            return base
        return np.where(nb["changed"].to_numpy(), _CHANGED_COLOR, base).tolist()  # k entries, not per post

    def _selected_points(self) -> np.ndarray | None:
        """Point numbers (int32) of the selected rows that are drawn, or None for no selection."""
        if not len(self._selection):
            return None
        rows = self._selection
        if self._pos_of is None:
            return rows.astype(np.int32)
        p = self._pos_of[rows]
        return p[p >= 0]

    def _render_overlays(self) -> None:
        if self._ui is None:
            return
        for v in self._views:
            with v.fig.batch_update():
                for name, (x, y) in self._overlay_xy(v).items():
                    v.overlays[name].x = x
                    v.overlays[name].y = y
                v.overlays["neighbors"].marker.color = self._neighbor_colors(v)

    def _render_color(self) -> None:
        if self._ui is None:
            return
        for vi, v in enumerate(self._views):
            with v.fig.batch_update():
                v.main.marker = self._marker(show_scale=vi == len(self._views) - 1)
        self._render_status()

    def _render_selection(self, source: int | None) -> None:
        if self._ui is None:
            return
        pts = self._selected_points()
        for vi, v in enumerate(self._views):
            if vi != source:  # the map the user selected on already shows its selection
                v.main.selectedpoints = pts
        self._render_status()

    def _render_status(self, error: str | None = None) -> None:
        if self._ui is None:
            return
        parts = [f"{self._n:,} posts"]
        if self._shown is not None:
            parts.append(f"{len(self._shown):,} drawn (random sample over a density image)")
        parts.append(f"{len(self._selection):,} selected")
        if self._current is not None:
            parts.append(f"open: <code>{escape(self.current_post_id)}</code>")
        html = " \u00b7 ".join(parts)
        if error:
            html += f' <span class="ccclip-error" style="color:#c00">{escape(error)}</span>'
        self._ui["status"].value = f'<span style="font-size:12px;color:#444">{html}</span>'

    # ================================================================================ internals: plotly events
    def _point_row(self, point: int) -> int:
        return int(point) if self._shown is None else int(self._shown[int(point)])

    def _plotly_click(self, vi: int, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            self._guard(self.click, self._point_row(points.point_inds[0]))

    def _plotly_hover(self, vi: int, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            self._guard(self.hover, self._point_row(points.point_inds[0]))

    def _plotly_selection(self, vi: int, trace: Any, points: Any, selector: Any) -> None:
        inds = np.asarray(points.point_inds, dtype=np.int64)
        rows = inds if self._shown is None else self._shown[inds].astype(np.int64)
        if self._shown is not None:
            # Only a sample is drawn: select every post inside the box or lasso, drawn or not.
            inside = _rows_inside(self._views[vi].coords, selector)
            if inside is not None:
                rows = inside
        self._guard(self._set_selection, np.unique(rows), vi)

    def _plotly_deselect(self, vi: int, trace: Any, points: Any) -> None:
        self._guard(self._set_selection, np.zeros(0, np.int64), vi)

    def _from_ui(self, setter: Callable[[Any], Any], value: Any, current: Any) -> None:
        """A menu changed: call its setter, unless the setter itself moved the menu to the value it holds."""
        if value != current:
            self._guard(setter, value)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a UI-triggered action; an error is shown in the status line instead of vanishing in a log."""
        try:
            return fn(*args)
        except Exception as exc:
            self.last_error = exc
            log.exception("Explorer action failed")
            self._render_status(f"{type(exc).__name__}: {exc}")
            return None


# ==================================================================================== module helpers
_EMPTY_CARD = '<div class="ccclip-card-empty" style="color:#777">Click a point to open its post.</div>'


def _check_model(model: Any, emb: Embeddings, name: str) -> None:
    if model is None:
        return
    fp = getattr(model, "fingerprint", None)
    if fp and emb.model_fingerprint and fp != emb.model_fingerprint:
        log.warning(
            "%s (%s) is not the model that made these embeddings (%s): search results will be meaningless",
            name,
            getattr(model, "spec", "?"),
            emb.model_spec,
        )


def _check_index(index: Any, table: pl.DataFrame, name: str) -> None:
    if index.n != table.height:
        raise ValueError(f"{name} holds {index.n} posts but the embeddings hold {table.height}")
    ids = index.post_ids
    if not ids.equals(table["post_id"], check_names=False):
        raise ValueError(f"{name} is not row-aligned with the embeddings' posts (post_id order differs)")


def _alignment(table: pl.DataFrame, other: pl.DataFrame) -> np.ndarray | None:
    """Rows of ``other`` in the order of ``table`` (``None`` when already aligned)."""
    a, b = table["post_id"], other["post_id"]
    if a.len() == b.len() and a.equals(b, check_names=False):
        return None
    if a.len() != b.len() or not a.is_in(b.implode()).all():
        missing = a.filter(~a.is_in(b.implode())).head(3).to_list()
        extra = b.filter(~b.is_in(a.implode())).head(3).to_list()
        raise ValueError(
            "compare must hold the same posts as embeddings "
            f"({a.len()} vs {b.len()}; only in the first: {missing}, only in the second: {extra})"
        )
    pos = pl.DataFrame({"post_id": b, "_pos": np.arange(b.len(), dtype=np.int64)})
    joined = pl.DataFrame({"post_id": a}).join(pos, on="post_id", how="left", maintain_order="left")
    return joined["_pos"].to_numpy()


def _coerce_coords(coords: Any, table: pl.DataFrame) -> np.ndarray:
    """``N x 2`` float32 C-contiguous coordinates from an array, a frame (``x``, ``y``; by ``post_id``) or a result
    object with ``coords``."""
    n = table.height
    for attr in ("coords", "embedding", "embedding_"):
        if not isinstance(coords, (np.ndarray, pl.DataFrame)) and hasattr(coords, attr):
            coords = getattr(coords, attr)
            break
    if isinstance(coords, pl.DataFrame):
        frame = coords
        if "post_id" in frame.columns:
            frame = table.select("post_id").join(frame, on="post_id", how="left", maintain_order="left")
        cols = ["x", "y"] if {"x", "y"} <= set(frame.columns) else frame.columns[-2:]
        arr = frame.select(cols).to_numpy()
    else:
        arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] != n:
        raise ValueError(f"coordinates must be {n} x 2, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("coordinates hold missing or non-finite values")
    return arr


def _as_float_column(out: Any, table: pl.DataFrame, name: str) -> np.ndarray:
    """A per-post float32 array from a backend result (array, Series, or frame with ``post_id``)."""
    if isinstance(out, pl.DataFrame):
        if "post_id" in out.columns:
            out = table.select("post_id").join(out, on="post_id", how="left", maintain_order="left")
        col = name if name in out.columns else next(c for c in out.columns if out[c].dtype.is_float())
        out = out[col]
    arr = (out.cast(pl.Float32).to_numpy() if isinstance(out, pl.Series) else np.asarray(out)).astype(
        np.float32
    )
    if arr.shape != (table.height,):
        raise ValueError(f"{name} gave shape {arr.shape} for {table.height} posts")
    return arr


def _default_color(table: pl.DataFrame) -> str:
    for name in ("caption_kind", "lang"):
        if name in table.columns and table[name].n_unique() > 1:
            return name
    return _NO_COLOR


def _column_color(col: pl.Series, max_categories: int = len(PALETTE)) -> _Color:
    """Int32 codes (strings, booleans, integers with few values) or float32 values (other numbers) for a column."""
    dtype = col.dtype
    name = col.name
    if dtype.is_float() or dtype.is_temporal() or (dtype.is_integer() and col.n_unique() > max_categories):
        if dtype.is_temporal():
            col = col.dt.epoch("s")
        values = col.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float32)
        return _Color(name, "continuous", values)
    s = col.cast(pl.String).fill_null(_MISSING)
    counts = s.value_counts(name="n").sort(["n", name], descending=[True, False])
    cats = counts[name].to_list()
    if len(cats) > max_categories:
        keep = sorted(cats[: max_categories - 1], key=_category_key)
        cats = [*keep, _OTHER]
    else:
        cats = sorted(cats, key=_category_key)
    other = len(cats) - 1
    codes = s.replace_strict(cats, list(range(len(cats))), default=other, return_dtype=pl.Int32).to_numpy()
    return _Color(name, "categorical", np.ascontiguousarray(codes, dtype=np.int32), cats)


def _category_key(cat: str) -> tuple[int, Any]:
    """Sort categories naturally (numbers by value), with "(missing)" last."""
    if cat == _MISSING:
        return (2, cat)
    try:
        return (0, float(cat))
    except ValueError:
        return (1, cat)


def _stepped_scale(k: int) -> list[list[Any]]:
    """A colorscale giving codes ``0..k-1`` (with ``cmin=-0.5``, ``cmax=k-0.5``) one flat palette color each."""
    k = max(k, 1)
    scale: list[list[Any]] = []
    for i in range(k):
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / k, c], [(i + 1) / k, c]]
    return scale


def _hover_texts(table: pl.DataFrame, rows: np.ndarray | None) -> list[str]:
    """Per-point hover label texts (only used for maps small enough to afford them)."""
    t = table.select("post_id", "text")
    if rows is not None:
        t = t[rows]
    text = (
        pl.col("text")
        .str.replace_all(r"\s+", " ")
        .str.replace_all("<", "\u2039")
        .str.replace_all(">", "\u203a")
    )
    short = pl.when(text.str.len_chars() > 100).then(text.str.slice(0, 99) + "\u2026").otherwise(text)
    return t.select((pl.col("post_id") + pl.lit(": ") + short).alias("h"))["h"].to_list()


def _rows_inside(coords: np.ndarray, selector: Any) -> np.ndarray | None:
    """Rows whose coordinates lie inside a plotly box or lasso selector; ``None`` when it has no usable shape."""
    from .. import projection

    kind = getattr(selector, "type", None)
    if kind == "box":
        xr, yr = getattr(selector, "xrange", None), getattr(selector, "yrange", None)
        return projection.rows_in_box(coords, xr, yr) if xr and yr else None
    if kind == "lasso":
        xs, ys = getattr(selector, "xs", None) or [], getattr(selector, "ys", None) or []
        return projection.rows_in_polygon(coords, xs, ys) if len(xs) >= 3 and len(xs) == len(ys) else None
    return None


def _density_trace(go: Any, coords: np.ndarray, bins: int = 200) -> Any:
    """A grey heatmap of point counts under a sampled scatter, so the undrawn points still show."""
    x, y = coords[:, 0], coords[:, 1]
    h, xe, ye = np.histogram2d(x, y, bins=bins)
    z = np.log1p(h.T).astype(np.float32)
    z[z == 0] = np.nan
    xc = ((xe[:-1] + xe[1:]) / 2).astype(np.float32)
    yc = ((ye[:-1] + ye[1:]) / 2).astype(np.float32)
    return go.Heatmap(
        x=xc, y=yc, z=z, colorscale="Greys", showscale=False, hoverinfo="skip", opacity=0.6, name="density"
    )


def _clusters(vectors: np.ndarray, seed: int) -> np.ndarray:
    """Int32 k-means cluster codes of the mapped vectors (FAISS; a sample trains, every post is assigned)."""
    import faiss

    n = vectors.shape[0]
    k = int(min(20, max(2, round(math.sqrt(n / 10)))))
    k = min(k, n)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=20,
        seed=seed,
        spherical=True,
        max_points_per_centroid=512,
        min_points_per_centroid=1,
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return np.ascontiguousarray(labels[:, 0], dtype=np.int32)


def _array_hash(a: np.ndarray) -> str:
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def _index_rows(frame: pl.DataFrame | None) -> np.ndarray:
    if frame is None or frame.height == 0:
        return np.zeros(0, np.int64)
    return frame["index"].to_numpy()


def _set_xy(trace: Any, coords: np.ndarray, rows: np.ndarray) -> None:
    xy = coords[rows] if len(rows) else np.zeros((0, 2), np.float32)
    trace.x = np.ascontiguousarray(xy[:, 0], dtype=np.float32)
    trace.y = np.ascontiguousarray(xy[:, 1], dtype=np.float32)
