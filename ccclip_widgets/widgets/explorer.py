"""The Explorer: a map of posts where a click shows which texts fit an image and which images fit a text.

:class:`Explorer` is the widget-free :class:`~ccclip_widgets.widgets.explorer_state.ExplorerState` (current post,
neighbors, filters, selection, colors, clusters, search) plus a view built lazily, the first time :attr:`widget`
is read or the Explorer is displayed (the convention of every widget here: see :mod:`._common`). The view
(:mod:`._explorer_view`, :mod:`._explorer_map`) only renders the state and forwards browser events to the same
methods code calls::

    ex = Explorer(embeddings, model=model)
    ex.set_filter(caption_kind="commentative", lang="uk").click("p0001")   # what a click does
    ex.neighbors                                   # polars frame shown in the neighbor list
    ex.set_map_filter("split", ["test"]).set_cluster_labels(True)
    ex.set_mode("text_to_images").select([1, 2, 3]).search("a red circle")
    ex.selection                                   # polars frame of the selected posts (map filter applied)

Layout: a toolbar (color, neighbor mode, k, neighbor filter; map filter and cluster labels; search), the legend,
then the map(s) beside a side panel holding, top down, the open post's card, the other posts of its image ("Same
image, N other posts", each a button that opens it), its neighbors, with two models what changed, and the search
results under their own heading with a Clear button. The hover preview sits under the map. Posts of one image
share a point on an image map: a click there opens the one that fits the filters and color
(:meth:`~.explorer_state.ExplorerState.point_post`), and the card lists the others.
With the defaults (map 460 px, side panel 350 px) the widget is about 820 px wide, which fits a 1280 px window
with JupyterLab's file browser open (checked by ``tests/browser/test_lab.py``).

DOM hooks for browser tests (CSS classes):

* ``ccclip-explorer`` (root), ``ccclip-toolbar``, ``ccclip-color``, ``ccclip-mode``, ``ccclip-k``,
  ``ccclip-neighbor-filter``, ``ccclip-map-filter`` (``ccclip-map-filter-column``, ``ccclip-map-filter-values``,
  ``ccclip-map-filter-range``, ``ccclip-map-filter-clear``), ``ccclip-clusters``, ``ccclip-status``,
  ``ccclip-legend`` (``.ccclip-legend-item[data-category]``), ``ccclip-progress`` (while building);
* ``ccclip-map``: the plotly graph div (traces ``posts``, ``current``, ``neighbors``, ``search``);
* ``ccclip-side``, ``ccclip-card`` (``.ccclip-card-body[data-post-id]``), ``ccclip-hover``;
* ``ccclip-same-image`` (hidden when the open post's image is its own): ``.ccclip-same-image-heading[data-count]``,
  rows ``ccclip-same-image-row`` (a ``ccclip-same-image-button`` reading ``"<lang> · <caption_kind>"`` and a
  ``.ccclip-same-image-text`` element with ``data-post-id``), then ``.ccclip-same-image-more[data-more]`` when
  the list is cut;
* ``ccclip-neighbors`` and ``ccclip-search-results`` (with ``ccclip-search-clear``), each holding rows
  ``ccclip-neighbor`` (plus ``ccclip-changed`` when the other model does not list it): a thumbnail, a
  ``ccclip-neighbor-button`` reading ``"<rank>. <post_id>"`` and a ``.ccclip-neighbor-text`` element with
  ``data-post-id``, ``data-rank`` and ``data-query``. Lists are updated before the card;
* ``ccclip-changes`` (two models): ``ccclip-rank-changes`` table and ``ccclip-moved`` list;
* ``ccclip-search`` (the box), ``ccclip-search-input``, ``ccclip-search-button``, ``ccclip-search-note``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from ._common import ThumbnailCache, escape, post_card_html, preload_plotly, truncate
from ._progress import default_progress
from .explorer_state import DERIVED_COLUMNS, MODES, ExplorerState

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Embeddings
    from ._explorer_view import ExplorerView

log = logging.getLogger(__name__)

__all__ = ["DERIVED_COLUMNS", "MODES", "Explorer", "ExplorerState"]

if "ipykernel" in sys.modules:  # in a notebook, plotly's slow first import overlaps the cells before the map
    preload_plotly()


class Explorer(ExplorerState):
    """An interactive map of posts with click-through neighbors, filters, clusters, selection and search.

    Parameters
    ----------
    embeddings
        Image and text vectors of the posts (from :func:`ccclip_widgets.embed_posts`).
    compare, compare_model, compare_index, compare_coords
        A second model's embeddings of the same posts (for example fine-tuned), its model (for search), index
        and coordinates: the maps are shown side by side with linked selection, neighbor lists mark what
        changed and show each neighbor's rank under the other model, and a panel lists the posts whose texts
        moved most.
    model
        The model that made ``embeddings``; needed only for free-text search.
    labels
        Titles of the two maps (default: the models' specs).
    index, coords
        Prebuilt :class:`~ccclip_widgets.neighbors.NeighborIndex` and ``N x 2`` map coordinates (an array, or a
        frame with ``post_id``, ``x``, ``y``); otherwise the backend builds them (UMAP on the index's kNN graph,
        cached on disk by fingerprint; the second map aligned to the first).
    projection, projection_kwargs
        Which vectors place the posts (``"image"`` or ``"text"``) and extra arguments for
        :func:`ccclip_widgets.projection.project_posts`.
    color, mode, k
        Initial color column (``"auto"``: caption kind, else language), neighbor mode (:data:`MODES`) and
        neighbors per click.
    max_points, hover_text_limit, density
        Draw at most ``max_points`` points (a seeded sample over a density image above it); per-point hover
        texts up to ``hover_text_limit`` drawn points; ``density`` forces the density image on or off.
    height, map_width, side_width
        Map height and width and side-panel width in pixels (with two maps the side panel goes below them).
    thumbnail_size, card_image_size
        Pixel sizes of list thumbnails and of the card image.
    seed, cache, show_progress
        Seed of the point sample and clusters; disk cache of layouts; progress while building (in a notebook,
        a progress line in the cell's output).
    """

    def __init__(
        self,
        embeddings: Embeddings,
        *,
        max_points: int = 200_000,
        hover_text_limit: int = 50_000,
        density: bool | Literal["auto"] = "auto",
        height: int = 500,
        map_width: int | None = None,
        side_width: int = 350,
        thumbnail_size: int = 48,
        card_image_size: int = 140,
        show_progress: bool = True,
        progress: Any = None,
        **state: Any,
    ) -> None:
        preload_plotly()  # overlap plotly's slow first import with the backend work
        if max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        self._max_points = int(max_points)
        self._hover_text_limit = int(hover_text_limit)
        self._density = density
        self._height = int(height)
        self._map_width = int(map_width) if map_width else 460
        self._side_width = int(side_width)
        self._thumb_size = int(thumbnail_size)
        self._card_size = int(card_image_size)
        self._thumbs = ThumbnailCache()
        self._view: ExplorerView | None = None
        self.last_error: BaseException | None = None
        own_progress = progress is None
        if own_progress:
            progress = default_progress(show_progress and self._first_run(embeddings, state))
        super().__init__(embeddings, show_progress=show_progress, progress=progress, **state)

    @staticmethod
    def _first_run(embeddings: Embeddings, state: dict[str, Any]) -> bool:
        """A progress line is worth showing only when the map must be computed (no coords given)."""
        return state.get("coords") is None or (
            state.get("compare") is not None and state.get("compare_coords") is None
        )

    @classmethod
    def _default_progress(cls, show_progress: bool) -> Any:
        return default_progress(show_progress) or super()._default_progress(show_progress)

    # ============================================================================== rendered state (HTML)
    @property
    def card(self) -> str:
        """HTML of the card of the open post (empty when none is open)."""
        p = self.current_post
        if p is None:
            return ""
        p = dict(p)
        row = p.pop("index")
        extra: dict[str, Any] = {}
        for name in ("commentativeness", "cluster_codes"):
            if name in self._derived:
                label = "cluster" if name == "cluster_codes" else name
                extra[label] = self._derived[name][row].item()
        if len(self.maps) == 2 and self.neighbors is not None:
            nb = self.neighbors
            extra[f"neighbors changed ({MODES[self.mode]})"] = f"{int(nb['changed'].sum())} of {nb.height}"
        img = self._thumbs.img_html(p, self._card_size, css_class="ccclip-card-image")
        return post_card_html(p, image_html=img, extra=extra)

    @property
    def hover_html(self) -> str:
        """HTML of the hover preview (thumbnail and text of the hovered post)."""
        if self.hovered_index is None:
            return ""
        p = self.post(self.hovered_index)
        img = self._thumbs.img_html(p, 2 * self._thumb_size)
        return (
            f'<div class="ccclip-hover-body" data-post-id="{escape(p["post_id"])}" '
            f'style="display:flex;gap:8px;align-items:flex-start">{img}<div style="min-width:0">'
            f'<div style="font-family:monospace">{escape(p["post_id"])}</div>'
            f"<div>{escape(truncate(p.get('text'), 280))}</div></div></div>"
        )

    @property
    def n_drawn(self) -> int:
        """Number of points drawn on each map (all posts unless above ``max_points``)."""
        return min(self.n, self._max_points)

    def __repr__(self) -> str:
        labels = " | ".join(v.label for v in self.maps)
        return (
            f"Explorer({self.n} posts, drawn={self.n_drawn}, maps=[{labels}], mode={self.mode!r}, "
            f"color={self.color_column!r}, current={self.current_post_id!r}, "
            f"selected={len(self.selected_indices)}, filter={self.neighbor_filter or None})"
        )

    # ============================================================================== the view
    @property
    def widget(self) -> Any:
        """The ipywidgets container, built on first access (and then kept in step with the state)."""
        if self._view is None:
            from ._explorer_view import ExplorerView

            self._view = ExplorerView(self)
        return self._view.root

    @property
    def view(self) -> ExplorerView | None:
        """The view object once :attr:`widget` was built, else ``None``."""
        return self._view

    @property
    def figures(self) -> list[Any]:
        """The plotly ``FigureWidget`` of each map (builds the widget)."""
        self.widget  # noqa: B018
        assert self._view is not None
        return [m.fig for m in self._view.maps]

    @property
    def panels(self) -> dict[str, Any]:
        """The named sub-widgets (builds the widget); see :attr:`ExplorerView.panels <._explorer_view.ExplorerView>`."""
        self.widget  # noqa: B018
        assert self._view is not None
        return dict(self._view.panels)

    def neighbor_rows(self, view: int = 0) -> list[Any]:
        """The row widgets of a neighbor list (``view`` 1 is the second model's list)."""
        return list(self.panels["neighbor_lists"][view].children[1:])

    def neighbor_buttons(self, view: int = 0) -> list[Any]:
        """The clickable button of each neighbor row; ``button.click()`` moves to that post."""
        return [row.children[1] for row in self.neighbor_rows(view)]

    def same_image_buttons(self) -> list[Any]:
        """The button of each listed post sharing the open post's image; ``button.click()`` opens that post."""
        return [row.children[0] for row in self.panels["same_image"].children[1:-1]]

    def search_buttons(self, view: int = 0) -> list[Any]:
        """The clickable button of each search result row."""
        return [row.children[1] for row in self.panels["search_lists"][view].children[1:]]

    def show(self) -> None:
        """Display the widget in the notebook."""
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(include=include, exclude=exclude, **kwargs)

    def _guard(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a UI-triggered action; an error is shown in the status line instead of vanishing in a log."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self.last_error = exc
            log.exception("Explorer action failed")
            if self._view is not None:
                self._view.render_status(f"{type(exc).__name__}: {exc}")
            return None
