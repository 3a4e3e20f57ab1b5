"""The Explorer's plotly maps: one ``FigureWidget`` per model, drawn from the state and redrawn when it changes.

Coordinates go to the browser as float32 arrays and colors as int32 codes or float32 values (binary buffers);
per-point hover texts only for maps up to ``hover_text_limit`` points; above ``max_points`` a seeded sample is
drawn over a density image of all posts. Posts that fail the map filter fade (a per-point opacity array). The color
legend is HTML beside the map (see :func:`~ccclip_widgets.widgets._colors.legend_html`), never a plotly color bar,
so a hover label cannot cover it. Cluster labels are layout annotations, toggled with the state's
``show_clusters``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ._colors import CONTINUOUS_SCALE, SINGLE_COLOR, stepped_scale
from ._common import escape

if TYPE_CHECKING:  # pragma: no cover
    from .explorer import Explorer

OVERLAY_STYLE: dict[str, dict[str, Any]] = {
    "search": {"symbol": "square-open", "size": 13, "color": "#2ca02c", "line": {"width": 2.5}},
    "neighbors": {"symbol": "circle-open", "size": 13, "color": "#ff7f0e", "line": {"width": 2.5}},
    "current": {"symbol": "circle-open", "size": 20, "color": "#d62728", "line": {"width": 3.5}},
}
CHANGED_COLOR = "#9467bd"
FADED_OPACITY = 0.06


class Sample:
    """Which rows are drawn: all (``shown is None``, point number == row) or a seeded sample of ``max_points``."""

    def __init__(self, n: int, max_points: int, seed: int) -> None:
        self.n = n
        self.shown: np.ndarray | None = None
        self.pos_of: np.ndarray | None = None
        if n > max_points:
            rng = np.random.default_rng(seed)
            self.shown = np.sort(rng.choice(n, max_points, replace=False)).astype(np.int32)
            self.pos_of = np.full(n, -1, np.int32)
            self.pos_of[self.shown] = np.arange(len(self.shown), dtype=np.int32)

    @property
    def n_drawn(self) -> int:
        return self.n if self.shown is None else len(self.shown)

    def row(self, point: int) -> int:
        return int(point) if self.shown is None else int(self.shown[int(point)])

    def points(self, rows: np.ndarray) -> np.ndarray:
        """Point numbers (int32) of the drawn ones among ``rows``."""
        if self.pos_of is None:
            return rows.astype(np.int32)
        p = self.pos_of[rows]
        return p[p >= 0]

    def drawn(self, values: np.ndarray) -> np.ndarray:
        return values if self.shown is None else values[self.shown]


def marker(ex: Explorer, sample: Sample) -> dict[str, Any]:
    """The posts trace's marker: size, opacity (faded outside the map filter) and the color arrays."""
    n = sample.n_drawn
    size = 7 if n <= 5_000 else 5 if n <= 50_000 else 3 if n <= 300_000 else 2
    opacity = 0.85 if n <= 50_000 else 0.7 if n <= 300_000 else 0.55
    m: dict[str, Any] = {"size": size, "opacity": opacity}
    visible = ex.visible
    if visible is not None:
        m["opacity"] = np.where(sample.drawn(visible), opacity, FADED_OPACITY).astype(np.float32)
    c = ex.color
    if c.kind == "none" or c.values is None:
        m["color"] = SINGLE_COLOR
        return m
    values = sample.drawn(c.values)
    if c.kind == "categorical":
        m.update(
            color=np.ascontiguousarray(values, dtype=np.int32),
            colorscale=stepped_scale(len(c.categories)),
            cmin=-0.5,
            cmax=len(c.categories) - 0.5,
            showscale=False,
        )
    else:
        lo, hi = c.range()
        m.update(
            color=np.ascontiguousarray(values, dtype=np.float32),
            colorscale=CONTINUOUS_SCALE,
            cmin=lo,
            cmax=hi,
            showscale=False,
        )
    return m


def hover_texts(table: pl.DataFrame, rows: np.ndarray | None) -> list[str]:
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


def _xy(coords: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xy = coords[rows] if len(rows) else np.zeros((0, 2), np.float32)
    return np.ascontiguousarray(xy[:, 0], np.float32), np.ascontiguousarray(xy[:, 1], np.float32)


def _rows(frame: pl.DataFrame | None) -> np.ndarray:
    return np.zeros(0, np.int64) if frame is None or frame.height == 0 else frame["index"].to_numpy()


class MapFigure:
    """The plotly figure of one model's map, kept in step with the Explorer's state."""

    def __init__(self, ex: Explorer, vi: int, go: Any, sample: Sample, *, width: int, height: int) -> None:
        self.ex, self.vi, self.sample = ex, vi, sample
        v = ex.maps[vi]
        rows = sample.shown
        x, y = _xy(v.coords, np.arange(ex.n) if rows is None else rows)
        traces: list[Any] = []
        if ex._density is True or (ex._density == "auto" and rows is not None):
            traces.append(_density_trace(go, v.coords))
        main: dict[str, Any] = {
            "x": x,
            "y": y,
            "mode": "markers",
            "name": "posts",
            "marker": marker(ex, sample),
            "showlegend": False,
            "selected": {"marker": {"opacity": 1.0}},
            "unselected": {"marker": {"opacity": 0.12}},
        }
        if rows is not None:
            main["customdata"] = rows  # int32 row numbers, sent as a binary buffer
        if len(ex.selected_indices):
            main["selectedpoints"] = sample.points(ex.selected_indices)
        if sample.n_drawn <= ex._hover_text_limit:
            main["hovertext"] = hover_texts(ex.posts, rows)
            main["hovertemplate"] = "%{hovertext}<extra></extra>"
        else:
            ref = "%{customdata}" if rows is not None else "%{pointNumber}"
            main["hovertemplate"] = f"post #{ref}<extra></extra>"
        traces.append(go.Scattergl(**main))
        for name, style in OVERLAY_STYLE.items():
            traces.append(
                go.Scattergl(
                    x=np.zeros(0, np.float32),
                    y=np.zeros(0, np.float32),
                    mode="markers",
                    name=name,
                    marker=dict(style),
                    hoverinfo="skip",
                    showlegend=False,
                )
            )
        self.fig = go.FigureWidget(
            data=traces,
            layout={
                "height": height,
                "width": width,
                "autosize": False,
                "margin": {"l": 4, "r": 4, "t": 30, "b": 4},
                "title": {"text": escape(v.label), "x": 0.01, "font": {"size": 13}},
                "xaxis": {"visible": False},
                "yaxis": {"visible": False},
                "dragmode": "zoom",
                "hovermode": "closest",
                "clickmode": "event",
                "uirevision": "ccclip",
                "template": "plotly_white",
                "showlegend": False,
                "annotations": self._annotations(),
            },
        )
        n_over = len(OVERLAY_STYLE)
        self.main = self.fig.data[len(traces) - 1 - n_over]
        self.overlays = {
            name: self.fig.data[len(traces) - n_over + i] for i, name in enumerate(OVERLAY_STYLE)
        }
        self.render_overlays()
        self.main.on_click(functools.partial(_forward, ex, "click", self))
        self.main.on_hover(functools.partial(_forward, ex, "hover", self))
        self.main.on_selection(self._on_selection)
        self.main.on_deselect(lambda trace, points: ex._guard(ex.select, None, source=self.vi))
        self.fig.add_class("ccclip-map")

    # ------------------------------------------------------------------ rendering
    def _annotations(self) -> list[dict[str, Any]]:
        if not self.ex.show_clusters:
            return []
        from ..clusters import cluster_centers

        frame = self.ex.clusters
        centers = cluster_centers(self.ex.maps[self.vi].coords, self.ex._cluster_codes())
        out = []
        for c, label in zip(frame["cluster"].to_list(), frame["label"].to_list()):
            if not label or c not in centers:
                continue
            x, y = centers[c]
            out.append(
                {
                    "x": x,
                    "y": y,
                    "text": _two_lines(label),
                    "showarrow": False,
                    "font": {"size": 11, "color": "#222"},
                    "bgcolor": "rgba(255,255,255,0.75)",
                    "borderpad": 2,
                    "name": f"cluster-{c}",
                }
            )
        return out

    def render_overlays(self) -> None:
        ex, v = self.ex, self.ex.maps[self.vi]
        cur = np.zeros(0, np.int64) if ex.current_index is None else np.array([ex.current_index], np.int64)
        with self.fig.batch_update():
            for name, rows in (
                ("current", cur),
                ("neighbors", _rows(v.neighbors)),
                ("search", _rows(v.search)),
            ):
                x, y = _xy(v.coords, rows)
                self.overlays[name].x = x
                self.overlays[name].y = y
            nb = v.neighbors
            color: Any = OVERLAY_STYLE["neighbors"]["color"]
            if nb is not None and "changed" in nb.columns and nb.height:
                color = np.where(nb["changed"].to_numpy(), CHANGED_COLOR, color).tolist()  # k entries
            self.overlays["neighbors"].marker.color = color

    def render_marker(self) -> None:
        with self.fig.batch_update():
            self.main.marker = marker(self.ex, self.sample)

    def render_selection(self) -> None:
        rows = self.ex.selected_indices
        self.main.selectedpoints = self.sample.points(rows) if len(rows) else None

    def render_annotations(self) -> None:
        self.fig.layout.annotations = self._annotations()

    # ------------------------------------------------------------------ events
    def _on_selection(self, trace: Any, points: Any, selector: Any) -> None:
        inds = np.asarray(points.point_inds, dtype=np.int64)
        shown = self.sample.shown
        rows = inds if shown is None else shown[inds].astype(np.int64)
        if shown is not None:
            # Only a sample is drawn: select every post inside the box or lasso, drawn or not.
            inside = _rows_inside(self.ex.maps[self.vi].coords, selector)
            if inside is not None:
                rows = inside
        self.ex._guard(self.ex.select, np.unique(rows), source=self.vi)


def _two_lines(label: str) -> str:
    """An annotation's text, escaped; a long label breaks after its first word."""
    words = [escape(w) for w in label.split(" \u00b7 ")]
    if len(label) > 18 and len(words) > 1:
        return words[0] + "<br>" + " \u00b7 ".join(words[1:])
    return " \u00b7 ".join(words)


def _forward(ex: Explorer, what: str, fig: MapFigure, trace: Any, points: Any, state: Any) -> None:
    if not points.point_inds:
        return
    row = fig.sample.row(points.point_inds[0])
    if what == "click":  # posts of one image share a point: the state picks which one the click opens
        ex._guard(ex.click_point, row, fig.vi)
    else:
        ex._guard(getattr(ex, what), row)


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
    h, xe, ye = np.histogram2d(coords[:, 0], coords[:, 1], bins=bins)
    z = np.log1p(h.T).astype(np.float32)
    z[z == 0] = np.nan
    xc = ((xe[:-1] + xe[1:]) / 2).astype(np.float32)
    yc = ((ye[:-1] + ye[1:]) / 2).astype(np.float32)
    return go.Heatmap(
        x=xc, y=yc, z=z, colorscale="Greys", showscale=False, hoverinfo="skip", opacity=0.6, name="density"
    )
