"""The Explorer's ipywidgets: toolbar, filters, legend, map(s) and side panel, redrawn from the state.

:class:`ExplorerView` subscribes to the state's ``on_change`` and redraws only the parts that changed; every
control calls a state method (through ``Explorer._guard``, so an error shows in the status line). Controls that
the state moved are set without calling back (:meth:`ExplorerView._sync`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from ._colors import legend_html
from ._common import escape, require_plotly, require_widgets, truncate
from ._explorer_map import MapFigure, Sample
from ._explorer_same_image import SameImagePanel
from .explorer_state import MODES

if TYPE_CHECKING:  # pragma: no cover
    from .explorer import Explorer

_EMPTY_CARD = '<div class="ccclip-card-empty" style="color:#777">Click a point to open its post.</div>'
_SORTS = {
    "rank_gain": ("own image found better after", True),
    "rank_loss": ("own image found worse after", False),
    "text_neighbors_changed": ("text's neighbors changed most", True),
    "score_change": ("text-image score rose most", True),
}


class ExplorerView:
    """The widgets of one :class:`~ccclip_widgets.widgets.Explorer`; ``root`` is what the notebook shows."""

    def __init__(self, ex: Explorer) -> None:
        w = require_widgets()
        go = require_plotly()
        self.ex = ex
        self._syncing = False
        two = len(ex.maps) > 1
        sample = Sample(ex.n, ex._max_points, ex._seed)
        self.maps = [
            MapFigure(ex, vi, go, sample, width=ex._map_width, height=ex._height)
            for vi in range(len(ex.maps))
        ]
        p: dict[str, Any] = {"maps": [m.fig for m in self.maps]}

        def dropdown(options: Any, value: Any, desc: str, css: str, width: str, setter: Any) -> Any:
            d = w.Dropdown(options=options, value=value, description=desc, layout=w.Layout(width=width))
            d.style.description_width = "initial"
            d.add_class(css)
            d.observe(lambda ch: self._from_ui(setter, ch["new"]), names="value")
            return d

        p["color"] = dropdown(
            ex.color_options, ex.color_column, "color", "ccclip-color", "190px", ex.set_color
        )
        p["mode"] = dropdown(
            [(lbl, key) for key, lbl in MODES.items()],
            ex.mode,
            "neighbors",
            "ccclip-mode",
            "210px",
            ex.set_mode,
        )
        p["k"] = w.BoundedIntText(
            value=ex.k, min=1, max=1000, description="k", layout=w.Layout(width="100px")
        )
        p["k"].style.description_width = "initial"
        p["k"].add_class("ccclip-k")
        p["k"].observe(lambda ch: self._from_ui(ex.set_k, ch["new"]), names="value")
        self._nf_options = ex.neighbor_filter_options()
        p["neighbor_filter"] = dropdown(
            [(lbl, i) for i, (lbl, _) in enumerate(self._nf_options)],
            self._nf_index(),
            "only",
            "ccclip-neighbor-filter",
            "230px",
            lambda i: ex.set_filter(self._nf_options[i][1]),
        )
        # map filter: a column, then its values (categorical) or a range (numbers)
        self._mf_options = ex.map_filter_options()
        p["map_filter_column"] = w.Dropdown(
            options=["(filter the map by\u2026)", *self._mf_options],
            description="",
            layout=w.Layout(width="190px"),
        )
        p["map_filter_column"].add_class("ccclip-map-filter-column")
        p["map_filter_column"].observe(lambda ch: self._show_filter_control(), names="value")
        p["map_filter_values"] = w.SelectMultiple(
            options=[], rows=3, layout=w.Layout(width="200px", display="none")
        )
        p["map_filter_values"].add_class("ccclip-map-filter-values")
        p["map_filter_values"].observe(lambda ch: self._map_filter_from_ui(), names="value")
        p["map_filter_range"] = w.FloatRangeSlider(
            continuous_update=False, readout_format=".3g", layout=w.Layout(width="260px", display="none")
        )
        p["map_filter_range"].add_class("ccclip-map-filter-range")
        p["map_filter_range"].observe(lambda ch: self._map_filter_from_ui(), names="value")
        p["map_filter_clear"] = w.Button(
            description="clear filters", icon="times", layout=w.Layout(width="auto")
        )
        p["map_filter_clear"].add_class("ccclip-map-filter-clear")
        p["map_filter_clear"].on_click(lambda _b: ex._guard(ex.clear_map_filters))
        p["clusters"] = w.ToggleButton(value=ex.show_clusters, description="cluster labels", icon="tags")
        p["clusters"].add_class("ccclip-clusters")
        p["clusters"].observe(lambda ch: self._from_ui(ex.set_cluster_labels, ch["new"]), names="value")
        map_filter = w.HBox(
            [
                p["map_filter_column"],
                p["map_filter_values"],
                p["map_filter_range"],
                p["map_filter_clear"],
                p["clusters"],
            ],
            layout=w.Layout(align_items="center", flex_flow="row wrap"),
        )
        map_filter.add_class("ccclip-map-filter")
        p["map_filter"] = map_filter

        # search box
        s_in = w.Text(
            placeholder="describe an image, press Enter" if ex.can_search else "search needs a model",
            continuous_update=False,
            disabled=not ex.can_search,
            layout=w.Layout(flex="1 1 auto", width="auto"),
        )
        s_in.add_class("ccclip-search-input")
        s_btn = w.Button(
            description="Search", icon="search", disabled=not ex.can_search, layout=w.Layout(width="auto")
        )
        s_btn.add_class("ccclip-search-button")
        s_in.observe(lambda ch: ex._guard(ex.search, ch["new"]) if ch["new"].strip() else None, names="value")
        s_btn.on_click(lambda _b: ex._guard(ex.search, s_in.value) if s_in.value.strip() else None)
        note = w.HTML(
            ""
            if ex.can_search
            else '<span class="ccclip-search-note" style="color:#777;font-size:12px">Free-text search is off: '
            "pass the model that made the embeddings, <code>Explorer(embeddings, model=model)</code>.</span>"
        )
        search = w.HBox([s_in, s_btn], layout=w.Layout(width="100%"))
        search.add_class("ccclip-search")
        p.update(search=search, search_input=s_in, search_button=s_btn, search_note=note)

        p["status"] = w.HTML()
        p["status"].add_class("ccclip-status")
        p["legend"] = w.HTML()
        p["legend"].add_class("ccclip-legend")
        # as wide as the map(s) at most: a long text wraps instead of widening the map column, which would push
        # the side panel out of the notebook
        p["hover"] = w.HTML(
            layout=w.Layout(min_height="40px", max_width=f"{len(self.maps) * ex._map_width}px")
        )
        p["hover"].add_class("ccclip-hover")

        # side panel: card (with the other posts of its image), neighbors, (what changed), search results
        p["card"] = w.HTML(_EMPTY_CARD)
        p["card"].add_class("ccclip-card")
        self.same_image = SameImagePanel(ex)
        p["same_image"] = self.same_image.box
        p["neighbor_heading"] = w.HTML()
        p["neighbor_lists"] = [self._list_box(v.label if two else "") for v in ex.maps]
        p["neighbors"] = w.VBox(
            [p["neighbor_heading"], w.HBox(p["neighbor_lists"]) if two else w.VBox(p["neighbor_lists"])]
        )
        p["neighbors"].add_class("ccclip-neighbors")
        p["search_heading"] = w.HTML()
        p["search_clear"] = w.Button(description="clear", icon="times", layout=w.Layout(width="auto"))
        p["search_clear"].add_class("ccclip-search-clear")
        p["search_clear"].on_click(lambda _b: ex._guard(ex.clear_search))
        p["search_lists"] = [self._list_box(v.label if two else "") for v in ex.maps]
        p["search_results"] = w.VBox(
            [
                w.HBox([p["search_heading"], p["search_clear"]], layout=w.Layout(align_items="center")),
                w.HBox(p["search_lists"]) if two else w.VBox(p["search_lists"]),
            ]
        )
        p["search_results"].add_class("ccclip-search-results")
        side_parts = [p["card"], p["same_image"], p["neighbors"]]
        if two:
            side_parts.append(self._changes_panel(w, p))
        side_parts += [p["search_results"]]
        for part in side_parts:
            part.layout.flex = "0 0 auto"  # never squash a panel: the side column scrolls instead
        p["side"] = side = w.VBox(
            side_parts,
            layout=w.Layout(
                width=f"{ex._side_width}px" if not two else f"{2 * ex._map_width + 8}px",
                flex="0 0 auto",
                max_height=f"{ex._height + 40}px" if not two else None,
                overflow="auto" if not two else "visible",
                padding="0 0 0 8px" if not two else "8px 0 0 0",
            ),
        )
        side.add_class("ccclip-side")

        boxes = [
            w.Box([m.fig], layout=w.Layout(width=f"{ex._map_width}px", overflow="hidden")) for m in self.maps
        ]
        map_col = w.VBox([w.HBox(boxes), p["hover"]], layout=w.Layout(flex="0 0 auto"))
        toolbar = w.VBox(
            [
                w.HBox(
                    [p["color"], p["mode"], p["k"], p["neighbor_filter"]],
                    layout=w.Layout(align_items="center", flex_flow="row wrap"),
                ),
                map_filter,
                w.HBox([search], layout=w.Layout(width=f"{min(ex._map_width + ex._side_width, 900)}px")),
                note,
                p["status"],
                p["legend"],
            ]
        )
        toolbar.add_class("ccclip-toolbar")
        body = w.HBox([map_col, side]) if not two else w.VBox([map_col, side])
        p["root"] = root = w.VBox([toolbar, body])
        root.add_class("ccclip-explorer")
        self.panels = p
        self.root = root
        ex.on_change(self._on_change)
        self._on_change(frozenset({"neighbors", "search", "color", "map_filter", "hover"}), "init")

    # ============================================================================== building blocks
    def _list_box(self, title: str) -> Any:
        """A titled column of rows: side by side (two models) the columns share the width; stacked in the side
        panel a list keeps its full height (a zero flex basis there would collapse it to nothing)."""
        w = require_widgets()
        head = w.HTML(f"<b>{escape(title)}</b>" if title else "")
        side_by_side = len(self.ex.maps) > 1
        return w.VBox([head], layout=w.Layout(flex="1 1 0" if side_by_side else "0 0 auto", min_width="0"))

    def _changes_panel(self, w: Any, p: dict[str, Any]) -> Any:
        p["rank_changes"] = w.HTML()
        p["rank_changes"].add_class("ccclip-rank-changes")
        p["moved_sort"] = w.Dropdown(
            options=[(lbl, key) for key, (lbl, _) in _SORTS.items()],
            description="sort",
            layout=w.Layout(width="300px"),
        )
        p["moved_button"] = w.Button(description="list the texts that moved most", icon="sort")
        p["moved_list"] = self._list_box("")
        p["moved_list"].add_class("ccclip-moved")
        p["moved_button"].on_click(lambda _b: self.ex._guard(self.render_moved))
        p["moved_sort"].observe(lambda ch: self.ex._guard(self.render_moved), names="value")
        box = w.VBox(
            [
                w.HTML("<b>What fine-tuning changed</b>"),
                p["rank_changes"],
                w.HBox([p["moved_sort"], p["moved_button"]], layout=w.Layout(flex_flow="row wrap")),
                p["moved_list"],
            ]
        )
        box.add_class("ccclip-changes")
        p["changes"] = box
        return box

    def _new_row(self) -> Any:
        """An empty clickable row: thumbnail, button, score and text (rows are reused from click to click)."""
        w = require_widgets()
        thumb = w.HTML(layout=w.Layout(flex="0 0 auto"))
        btn = w.Button(layout=w.Layout(width="auto", min_width="80px", flex="0 0 auto"))
        btn.add_class("ccclip-neighbor-button")
        btn.target_row = None
        btn.on_click(
            lambda b: self.ex._guard(self.ex.click, b.target_row) if b.target_row is not None else None
        )
        # the text wraps onto its own full-width line under the thumbnail and button (a narrow side panel
        # would otherwise squeeze it into a column a few words wide)
        text = w.HTML(layout=w.Layout(flex="1 1 100%", min_width="0"))
        box = w.HBox([thumb, btn, text], layout=w.Layout(align_items="center", flex_flow="row wrap"))
        box.add_class("ccclip-neighbor")
        return box

    def _set_row(self, box: Any, rec: dict[str, Any], query: str, note: str = "") -> None:
        thumb, btn, text = box.children
        row = int(rec["index"])
        pid = str(rec["post_id"])
        changed = bool(rec.get("changed"))
        thumb.value = self.ex._thumbs.img_html(self.ex.posts.row(row, named=True), self.ex._thumb_size)
        btn.description = f"{rec.get('rank', '')}. {pid}"
        btn.tooltip = truncate(rec.get("text"), 300)
        btn.target_row = row
        extra = f'<span class="ccclip-score">{float(rec["score"]):.3f}</span>' if "score" in rec else ""
        if "rank_other" in rec:
            other = "\u2013" if rec["rank_other"] is None else rec["rank_other"]
            extra += f' \u00b7 <span class="ccclip-rank-other">other model: {other}</span>'

        if changed:
            extra += ' <span class="ccclip-changed-badge" style="color:#9467bd">\u25c6 changed</span>'
        text.value = (
            f'<div class="ccclip-neighbor-text" data-post-id="{escape(pid)}" data-rank="{rec.get("rank", "")}" '
            f'data-query="{escape(query)}" style="font-size:12px;line-height:1.3">'
            f"{extra}{escape(note)}<br>{escape(truncate(rec.get('text'), 140))}</div>"
        )
        (box.add_class if changed else box.remove_class)("ccclip-changed")

    def _fill(self, box: Any, frame: pl.DataFrame | None, query: str, notes: list[str] | None = None) -> None:
        recs = [] if frame is None else frame.to_dicts()
        pool: list[Any] = getattr(box, "row_pool", [])
        box.row_pool = pool
        while len(pool) < len(recs):
            pool.append(self._new_row())
        for i, (widget, rec) in enumerate(zip(pool, recs)):
            self._set_row(widget, rec, query, notes[i] if notes else "")
        box.children = [box.children[0], *pool[: len(recs)]]

    # ============================================================================== rendering
    def _on_change(self, parts: frozenset[str], source: Any) -> None:
        ex, p = self.ex, self.panels
        self._sync()
        if parts & {"neighbors", "current", "neighbor_filter"}:
            # lists first, then the card: once the browser shows the new card, the lists are new too
            for v, box in zip(ex.maps, p["neighbor_lists"]):
                self._fill(box, v.neighbors, ex.current_post_id or "")
            p["neighbor_heading"].value = self._neighbor_heading()
            if "rank_changes" in p:
                p["rank_changes"].value = _rank_changes_html(ex.rank_changes, ex.k)
            self.same_image.render()
            p["card"].value = ex.card or _EMPTY_CARD
        if parts & {"search", "neighbor_filter"}:
            for v, box in zip(ex.maps, p["search_lists"]):
                self._fill(box, v.search, ex.search_query or "")
            has = ex.search_query is not None
            p["search_heading"].value = (
                f"<b>Search results</b> for \u201c{escape(truncate(ex.search_query, 60))}\u201d"
                if has
                else ""
            )
            p["search_clear"].layout.display = None if has else "none"
            p["search_results"].layout.display = None if has else "none"
        if parts & {"neighbors", "search", "current"}:
            for m in self.maps:
                m.render_overlays()
        if parts & {"color", "map_filter"}:
            for m in self.maps:
                m.render_marker()
            p["legend"].value = legend_html(ex.color)
        if parts & {"selection", "map_filter"}:
            for vi, m in enumerate(self.maps):
                if vi != source or "map_filter" in parts:  # the map the user selected on shows it already
                    m.render_selection()
        if "show_clusters" in parts:
            for m in self.maps:
                m.render_annotations()
        if "hover" in parts:
            p["hover"].value = ex.hover_html
        self.render_status()

    def _neighbor_heading(self) -> str:
        ex = self.ex
        if ex.current_index is None:
            return ""
        filt = " \u00b7 ".join(f"{c}: {', '.join(v)}" for c, v in ex.neighbor_filter.items())
        only = f' <span style="color:#555">(only {escape(filt)})</span>' if filt else ""
        return f"<b>Neighbors</b>: {escape(MODES[ex.mode])}{only}"

    def render_moved(self) -> None:
        """Fill the list of posts whose texts moved most between the models, in the chosen order."""
        key = self.panels["moved_sort"].value
        col, desc = ("rank_gain", False) if key == "rank_loss" else (key, _SORTS[key][1])
        frame = self.ex.text_shift(col, descending=desc).head(15)
        notes = [
            f" rank of own image {r['rank_a'] or '>100'} \u2192 {r['rank_b'] or '>100'}"
            f" \u00b7 text neighbors changed {r['text_neighbors_changed']:.0%}"
            for r in frame.iter_rows(named=True)
        ]
        self._fill(
            self.panels["moved_list"],
            frame.drop("score_a", "score_b").with_columns(rank=pl.int_range(1, frame.height + 1)),
            "moved",
            notes,
        )

    def render_status(self, error: str | None = None) -> None:
        ex = self.ex
        parts = [f"{ex.n:,} posts"]
        if ex.n_drawn < ex.n:
            parts.append(f"{ex.n_drawn:,} drawn (random sample over a density image)")
        vis = ex.visible
        if vis is not None:
            parts.append(f"{int(vis.sum()):,} match the map filter")
        parts.append(f"{len(ex.selected_indices):,} selected")
        if ex.current_index is not None:
            parts.append(f"open: <code>{escape(ex.current_post_id)}</code>")
        html = " \u00b7 ".join(parts)
        if error:
            html += f' <span class="ccclip-error" style="color:#c00">{escape(error)}</span>'
        self.panels["status"].value = f'<span style="font-size:12px;color:#444">{html}</span>'

    # ============================================================================== controls <-> state
    def _nf_index(self) -> int:
        current = self.ex.neighbor_filter
        for i, (_, spec) in enumerate(self._nf_options):
            if {c: [v] for c, v in spec.items()} == current:
                return i
        return 0

    def _sync(self) -> None:
        """Move the controls to the state's values without calling back into the state."""
        ex, p = self.ex, self.panels
        self._syncing = True
        try:
            for name, value in (
                ("color", ex.color_column),
                ("mode", ex.mode),
                ("k", ex.k),
                ("clusters", ex.show_clusters),
            ):
                if p[name].value != value:
                    p[name].value = value
            i = self._nf_index()
            if p["neighbor_filter"].value != i and (i or not ex.neighbor_filter):
                p["neighbor_filter"].value = i
        finally:
            self._syncing = False

    def _from_ui(self, setter: Any, value: Any) -> None:
        if not self._syncing:
            self.ex._guard(setter, value)

    def _show_filter_control(self) -> None:
        p, ex = self.panels, self.ex
        col = p["map_filter_column"].value
        kind = self._mf_options.get(col)
        self._syncing = True
        try:
            p["map_filter_values"].layout.display = "none"
            p["map_filter_range"].layout.display = "none"
            if kind == "values":
                p["map_filter_values"].options = ex.filter_values(col)
                p["map_filter_values"].value = tuple(ex.map_filter.get(col, ()))
                p["map_filter_values"].layout.display = None
            elif kind == "range":
                s = ex._column(col)
                s = s.dt.epoch("s") if s.dtype.is_temporal() else s
                vals = s.cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
                lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
                rng = p["map_filter_range"]
                rng.min, rng.max = -1e300, 1e300
                rng.min, rng.max = lo, hi if hi > lo else lo + 1
                rng.step = (rng.max - rng.min) / 100
                cur = ex.map_filter.get(col)
                rng.value = (
                    cur[0] if cur and cur[0] is not None else rng.min,
                    cur[1] if cur and cur[1] is not None else rng.max,
                )
                rng.layout.display = None
        finally:
            self._syncing = False

    def _map_filter_from_ui(self) -> None:
        if self._syncing:
            return
        p, ex = self.panels, self.ex
        col = p["map_filter_column"].value
        kind = self._mf_options.get(col)
        if kind == "values":
            vals = list(p["map_filter_values"].value)
            ex._guard(ex.set_map_filter, col, vals or None)
        elif kind == "range":
            lo, hi = p["map_filter_range"].value
            rng = p["map_filter_range"]
            full = lo <= rng.min and hi >= rng.max
            s = ex._column(col)
            if s.dtype.is_temporal() and not full:
                lo, hi = (pl.Series([lo, hi]).cast(pl.Int64) * 1_000_000).cast(pl.Datetime("us")).to_list()
            ex._guard(ex.set_map_filter, col, None if full else (lo, hi))


def _rank_changes_html(frame: pl.DataFrame | None, k: int) -> str:
    if frame is None or frame.height == 0:
        return '<span style="color:#777;font-size:12px">Open a post to see how its neighbors moved.</span>'
    rows = []
    for r in frame.sort("rank_a").iter_rows(named=True):
        ch = int(r["change"])
        arrow = (
            f'<span style="color:#2ca02c">\u25b2{ch}</span>'
            if ch > 0
            else f'<span style="color:#d62728">\u25bc{-ch}</span>'
            if ch < 0
            else "="
        )
        rows.append(
            f'<tr data-post-id="{escape(r["post_id"])}"><td style="font-family:monospace">{escape(r["post_id"])}</td>'
            f"<td>{r['rank_a']} \u2192 {r['rank_b']}</td><td>{arrow}</td>"
            f'<td style="color:#555">{escape(truncate(r.get("text"), 60))}</td></tr>'
        )
    head = "<tr><th>post</th><th>rank before \u2192 after</th><th></th><th>text</th></tr>"
    return f'<table style="font-size:12px" class="ccclip-rank-table">{head}{"".join(rows)}</table>'
