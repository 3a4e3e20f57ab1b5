"""The Gap view's widgets: controls, the bar chart, the per-group table and the caption box over a :class:`Gap`.

The view keeps no state beyond its widgets: it draws what :class:`~.gap.Gap` reports (its ``chart_spec``,
``table`` and ``caption_results``) whenever the state says something changed (:meth:`Gap.on_change`), and turns
control changes into calls on the state.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ._common import ThumbnailCache, escape, require_plotly, require_widgets, truncate
from ._gap_metrics import DIRECTION_LABELS, KS

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .gap import Gap

__all__ = ["GapView"]

_AXIS_NAMES = {"caption_kind": "caption kind", "lang": "language"}


class GapView:
    """Widgets for one :class:`Gap`.

    Parameters
    ----------
    state
        The view's state object.
    thumb_cache
        Thumbnails for the caption box (default: a new cache of 256).
    """

    def __init__(self, state: Gap, thumb_cache: ThumbnailCache | None = None) -> None:
        self.state = state
        self._lock = threading.RLock()
        self._thumbs = thumb_cache or ThumbnailCache(maxsize=256)
        self._w: dict[str, Any] = {}
        self._widget: Any = None
        self._figure: Any = None
        self._syncing = False
        state.on_change(self.update)

    # ------------------------------------------------------------------------------------------ update path
    def update(self, parts: set[str]) -> None:
        """Redraw what changed (called by the state)."""
        with self._lock:
            if parts & {"models", "settings"}:
                self._sync_controls()
                self._draw_chart()
                self._render_table()
            if "caption" in parts:
                self._render_caption()
            if "status" in parts:
                self._render_status()

    # ------------------------------------------------------------------------------------------ chart
    @property
    def figure(self) -> Any:
        """The bar chart: one bar per model in each group (caption kind x language), error bars, chance line."""
        if self._figure is None:
            go = require_plotly()
            fig = go.FigureWidget()
            fig.update_layout(
                barmode="group",
                height=420,
                margin={"l": 60, "r": 20, "t": 60, "b": 70},
                xaxis={"title": {"text": ""}},
                yaxis={"range": [0, 1.05], "title": {"text": "Recall@k"}},
                legend={
                    "title": {"text": "model"},
                    "orientation": "h",
                    "y": 1.0,
                    "yanchor": "bottom",
                    "x": 0,
                },
                showlegend=True,
                template="plotly_white",
                hoverlabel={"namelength": -1},
            )
            fig.add_class("ccclip-gap-chart")
            self._figure = fig
            self._draw_chart()
        return self._figure

    def _draw_chart(self) -> None:
        fig = self._figure
        if fig is None:
            return
        go = require_plotly()
        spec = self.state.chart_spec()
        by, groups = spec["by"], spec["groups"]
        if len(by) == 2:
            x: Any = [[g[0] for g in groups], [g[1] for g in groups]]
        else:
            x = [g[0] for g in groups]
        names = " / ".join(_AXIS_NAMES.get(c, c) for c in by)
        traces = []
        for bar in spec["bars"]:
            y = bar["y"]
            up = [max(0.0, h - v) if np.isfinite(h) and np.isfinite(v) else 0.0 for h, v in zip(bar["hi"], y)]
            down = [
                max(0.0, v - lo) if np.isfinite(lo) and np.isfinite(v) else 0.0 for lo, v in zip(bar["lo"], y)
            ]
            custom = [[n, p, lo, hi] for n, p, lo, hi in zip(bar["n"], bar["pool"], bar["lo"], bar["hi"])]
            traces.append(
                go.Bar(
                    name=bar["name"],
                    x=x,
                    y=y,
                    marker={"color": bar["color"]},
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": up,
                        "arrayminus": down,
                        "visible": True,
                        "thickness": 1.5,
                        "width": 5,
                    },
                    customdata=custom,
                    hovertemplate=(
                        f"{escape(bar['name'])} \u00b7 %{{x}}<br>{spec['y_title']} = %{{y:.3f}} "
                        "[%{customdata[2]:.3f}, %{customdata[3]:.3f}]<br>%{customdata[0]} queries, "
                        "%{customdata[1]} candidates<extra></extra>"
                    ),
                )
            )
        chance = spec["chance"]
        if groups and any(np.isfinite(c) for c in chance):
            label = f"chance ({spec['y_title']} = {chance[0]:.3f})" if len(set(chance)) == 1 else "chance"
            traces.append(
                go.Scatter(
                    name=label,
                    x=x,
                    y=chance,
                    mode="lines+markers",
                    marker={"symbol": "line-ew-open", "size": 28, "color": "#444"},
                    line={"color": "rgba(0,0,0,0)"},
                    hovertemplate=f"chance {spec['y_title']} = %{{y:.3f}}<extra></extra>",
                )
            )
        with fig.batch_update():
            fig.data = []
            fig.layout.title.text = spec["title"]
            fig.layout.yaxis.title.text = spec["y_title"]
            fig.layout.xaxis.title.text = names
        if traces:
            fig.add_traces(traces)

    # ------------------------------------------------------------------------------------------ panels
    def _render_table(self) -> None:
        w = self._w.get("table")
        if w is None:
            return
        st = self.state
        w.value = table_html(st.table, st.group_by, st.direction, st.k, st._notes())

    def _render_status(self) -> None:
        w = self._w.get("status")
        if w is not None:
            w.value = f'<span style="color:#555">{escape(self.state.status)}</span>'

    def _render_caption(self) -> None:
        w = self._w.get("results")
        if w is None:
            return
        st = self.state
        with st._lock:
            results = dict(st.caption_results)
            caption = st._last_caption
            entries = {n: st._entries[n] for n in st.selected}
        if not caption:
            w.value = '<div style="color:#777">Type a caption and press Search.</div>'
            return
        cols = []
        for name, e in entries.items():
            head = f'<div style="font-weight:bold;margin-bottom:4px">{escape(name)}</div>'
            if name not in results:
                why = (
                    "training: re-embed the posts with the finished model"
                    if e.note
                    else "no model to encode text"
                )
                cols.append(
                    f'<div class="ccclip-gap-try-model" data-model="{escape(name)}" style="min-width:160px">'
                    f'{head}<div style="color:#777">{escape(why)}</div></div>'
                )
                continue
            cards = []
            rows = {r["post_id"]: r for r in e.table.iter_rows(named=True)} if results[name].height else {}
            for hit in results[name].iter_rows(named=True):
                post = rows[hit["post_id"]]
                img = self._thumbs.img_html(post, st.thumb_size)
                cards.append(
                    f'<div class="ccclip-gap-hit" data-post-id="{escape(hit["post_id"])}" '
                    'style="display:flex;gap:6px;align-items:flex-start;margin-bottom:6px">'
                    f'{img}<div style="font-size:12px;min-width:0">'
                    f'<div style="font-family:monospace">#{hit["rank"]} {escape(hit["post_id"])}</div>'
                    f'<div style="color:#555">score {hit["score"]:.3f}</div>'
                    f"<div>{escape(truncate(hit['text'], 90))}</div></div></div>"
                )
            cols.append(
                f'<div class="ccclip-gap-try-model" data-model="{escape(name)}" style="min-width:200px;flex:1">'
                f"{head}{''.join(cards)}</div>"
            )
        w.value = (
            f'<div style="margin:4px 0">Top images for <i>{escape(caption)}</i></div>'
            f'<div style="display:flex;gap:16px;align-items:flex-start">{"".join(cols)}</div>'
        )

    # ------------------------------------------------------------------------------------------ controls
    def _group_options(self) -> list[str]:
        st = self.state
        with st._lock:
            tables = [e.table for e in st._entries.values()]
        opts: dict[str, None] = {}
        for t in tables:
            for c, dt in t.schema.items():
                if c in _NOT_GROUPS:
                    continue
                if dt in (pl.String, pl.Categorical, pl.Boolean) or dt.is_integer():
                    opts.setdefault(c, None)
        for c in st._group_by:
            opts.setdefault(c, None)
        return list(opts)

    def _sync_controls(self) -> None:
        if not self._w:
            return
        st = self.state
        self._syncing = True
        try:
            w = self._w
            w["models"].options = st.models
            w["models"].value = tuple(st.selected)
            opts = self._group_options()
            w["group_by"].options = opts
            w["group_by"].value = tuple(c for c in st._group_by if c in opts)
            w["k"].value = f"R@{st.k}"
            w["direction"].value = st.direction
        finally:
            self._syncing = False

    def control(self, key: str) -> Any:
        """One control or panel by key: ``models``, ``group_by``, ``k``, ``direction``, ``table``, ``caption``,
        ``search``, ``results``, ``status``."""
        self.widget  # noqa: B018 - build first
        return self._w[key]

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first access)."""
        if self._widget is None:
            with self._lock:
                self._build()
        return self._widget

    def _build(self) -> None:
        widgets = require_widgets()
        st = self.state
        fig = self.figure
        w: dict[str, Any] = {}
        label = {"description_width": "initial"}
        w["models"] = widgets.SelectMultiple(
            options=st.models, value=tuple(st.selected), description="models", rows=3, style=label
        )
        opts = self._group_options()
        w["group_by"] = widgets.SelectMultiple(
            options=opts,
            value=tuple(c for c in st._group_by if c in opts),
            description="table by",
            rows=3,
            style=label,
        )
        w["k"] = widgets.ToggleButtons(
            options=[f"R@{k}" for k in KS], value=f"R@{st.k}", description="metric"
        )
        w["k"].style.button_width = "auto"
        w["k"].style.description_width = "initial"
        w["direction"] = widgets.ToggleButtons(
            options=[(lab, key) for key, lab in DIRECTION_LABELS.items()], value=st.direction
        )
        w["direction"].style.button_width = "auto"
        w["table"] = widgets.HTML()
        w["table"].add_class("ccclip-gap-table")
        w["status"] = widgets.HTML(f'<span style="color:#555">{escape(st.status)}</span>')
        w["status"].add_class("ccclip-gap-status")
        w["caption"] = widgets.Text(
            placeholder="type a caption, e.g. 'monday mood'", layout={"width": "420px"}
        )
        w["caption"].add_class("ccclip-gap-try-input")
        w["search"] = widgets.Button(description="Search", icon="search", button_style="primary")
        w["search"].add_class("ccclip-gap-try-button")
        w["results"] = widgets.HTML()
        w["results"].add_class("ccclip-gap-try-results")
        self._w = w

        def on_models(change: Any) -> None:
            if not self._syncing:
                st.select(*change["new"]) if change["new"] else st.select()

        def on_group(change: Any) -> None:
            if not self._syncing:
                st.set_group_by(*change["new"])

        def on_k(change: Any) -> None:
            if not self._syncing:
                st.set_k(int(str(change["new"]).split("@")[1]))

        def on_direction(change: Any) -> None:
            if not self._syncing:
                st.set_direction(change["new"])

        def on_search(_: Any = None) -> None:
            try:
                st.try_caption(w["caption"].value)
            except Exception as exc:  # show the problem in the panel, not only in the log
                w[
                    "results"
                ].value = f'<div style="color:#b00">{escape(type(exc).__name__)}: {escape(exc)}</div>'

        w["models"].observe(on_models, names="value")
        w["group_by"].observe(on_group, names="value")
        w["k"].observe(on_k, names="value")
        w["direction"].observe(on_direction, names="value")
        w["search"].on_click(on_search)
        w["caption"].continuous_update = False
        w["caption"].observe(lambda ch: on_search() if ch["new"] else None, names="value")

        chart_box = widgets.VBox([fig])
        chart_box.add_class("ccclip-gap-chart-box")
        try_box = widgets.VBox(
            [widgets.HTML("<b>Try a caption</b>"), widgets.HBox([w["caption"], w["search"]]), w["results"]]
        )
        try_box.add_class("ccclip-gap-try")
        controls = widgets.HBox([w["models"], w["group_by"], widgets.VBox([w["k"], w["direction"]])])
        controls.add_class("ccclip-gap-controls")
        box = widgets.VBox([controls, chart_box, w["status"], w["table"], try_box])
        box.add_class("ccclip-gap")
        self._widget = box
        self._render_table()
        self._render_caption()


#: Columns never offered for grouping (plumbing or per-post values).
_NOT_GROUPS = frozenset(
    {"post_id", "image", "image_path", "image_bytes", "text", "image_key", "text_key", "row", "timestamp"}
)


def _ci_cell(row: Mapping[str, Any], k: int, bold: bool) -> str:
    est = row.get(f"r_at_{k}")
    if est is None or np.isnan(est):
        return "<td>-</td>"
    lo, hi = row.get(f"r_at_{k}_lo"), row.get(f"r_at_{k}_hi")
    ci = ""
    if lo is not None and hi is not None and not np.isnan(lo):
        ci = f' <span style="color:#888;font-size:11px">[{lo:.2f}, {hi:.2f}]</span>'
    value = f"<b>{est:.2f}</b>" if bold else f"{est:.2f}"
    return f'<td style="text-align:right;padding:2px 8px">{value}{ci}</td>'


def table_html(
    df: pl.DataFrame, group_by: Sequence[str], direction: str, k: int, notes: Mapping[str, str]
) -> str:
    """One row per group, per model R@1/5/10 with intervals, for one direction."""
    if df.height == 0:
        return '<div style="color:#777">No models yet: add one with Gap.add_model(name, embeddings).</div>'
    df = df.filter(pl.col("direction") == direction)
    gcols = [c for c in group_by if c in df.columns]
    models = list(dict.fromkeys(df["model"].to_list()))
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in df.iter_rows(named=True):
        by_key.setdefault(tuple(r[c] for c in gcols), {})[r["model"]] = r
    th = 'style="text-align:left;padding:2px 8px;border-bottom:1px solid #ccc"'
    head1 = "".join(f"<th {th} rowspan=2>{escape(c)}</th>" for c in gcols)
    head1 += f"<th {th} rowspan=2>n</th><th {th} rowspan=2>pool</th>"
    for m in models:
        label = escape(m) + (f' <span style="color:#888">({escape(notes[m])})</span>' if m in notes else "")
        head1 += f'<th {th} colspan={len(KS)} data-model="{escape(m)}">{label}</th>'
    head2 = "".join(f"<th {th}>R@{kk}</th>" for _ in models for kk in KS)
    body = []
    for key, per_model in by_key.items():
        ref = next(iter(per_model.values()))
        cells = "".join(f'<td style="padding:2px 8px">{escape(v)}</td>' for v in key)
        cells += f'<td style="padding:2px 8px">{ref["n_queries"]}</td><td style="padding:2px 8px">{ref["pool_size"]}</td>'
        for m in models:
            r = per_model.get(m)
            cells += "".join(_ci_cell(r, kk, kk == k) if r else "<td>-</td>" for kk in KS)
        body.append(f"<tr>{cells}</tr>")
    caption = (
        f"{DIRECTION_LABELS.get(direction, direction)} retrieval by {', '.join(gcols) or 'all posts'}: "
        "Recall@k with 95% bootstrap intervals; n = queries, pool = candidates per group"
    )
    return (
        f'<table class="ccclip-gap-table-body" style="border-collapse:collapse;font-size:13px">'
        f'<caption style="caption-side:top;text-align:left;color:#555">{escape(caption)}</caption>'
        f"<thead><tr>{head1}</tr><tr>{head2}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
