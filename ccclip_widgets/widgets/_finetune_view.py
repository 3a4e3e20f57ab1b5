"""The FineTune panel's view: ipywidgets controls and two plotly charts over a :class:`FineTune` state.

The view holds no state of its own beyond its widgets: it renders what :class:`~.finetune.FineTune` reports
through :meth:`FineTune.on_change` and turns clicks and edits into calls on it (``configure``, ``start``,
``stop``, ``reembed``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._common import escape, require_plotly, require_widgets

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .finetune import FineTune

__all__ = ["FineTuneView", "error_html"]

STATUS_COLORS = {
    "idle": "#555",
    "running": "#1f6feb",
    "stopping": "#b07d00",
    "finished": "#1a7f37",
    "stopped": "#b07d00",
    "failed": "#b00020",
}
SERIES_COLORS = {"descriptive": "#4C78A8", "commentative": "#F58518", "all": "#54A24B", "chance": "#999999"}
_DASHES = ("solid", "dot", "dash", "dashdot")
#: Labels of the settings controls, shown in full beside them (not cut by a description width).
LABELS = {
    "epochs": "epochs",
    "max_steps": "max steps (0: run the epochs)",
    "batch_size": "batch size",
    "lr": "learning rate",
    "trains": "what trains",
    "unlock_blocks": "unlock the last N blocks",
    "eval_every_steps": "evaluate every N steps (0: each epoch)",
}


def error_html(exc: BaseException | None, hint: str, trace: str) -> str:
    """The error panel: exception type and message, a hint, and the traceback folded away."""
    if exc is None:
        return ""
    return (
        '<div style="border:1px solid #b00020;background:#fff5f5;padding:8px;border-radius:4px">'
        f'<div><b style="color:#b00020">{escape(type(exc).__name__)}</b>: '
        f'<span class="ccclip-ft-error-message">{escape(exc)}</span></div>'
        f'<div class="ccclip-ft-error-hint" style="margin-top:4px">Hint: {escape(hint)}</div>'
        f'<details style="margin-top:4px"><summary>traceback</summary>'
        f'<pre style="font-size:11px;white-space:pre-wrap">{escape(trace)}</pre></details></div>'
    )


class FineTuneView:
    """Widgets for one :class:`FineTune`: settings, Start/Stop, progress, status, charts, checkpoint, re-embed.

    Parameters
    ----------
    state
        The panel's state object.
    """

    def __init__(self, state: FineTune) -> None:
        self.state = state
        self._lock = threading.RLock()
        self._w: dict[str, Any] = {}
        self._widget: Any = None
        self._loss_fig: Any = None
        self._metric_fig: Any = None
        self._syncing = False
        self._last_draw = 0.0
        self._drawn = {"loss": -1, "evals": -1}
        state.on_change(self.update)

    # ------------------------------------------------------------------------------------------ update path
    def update(self, parts: set[str]) -> None:
        """Render the parts of the state that changed (the state calls this; throttled for per-step parts)."""
        with self._lock:
            if "settings" in parts:
                self._sync_controls()
            if "error" in parts:
                self._render_error()
            final = self.state.status not in ("running", "stopping")
            now = time.monotonic()
            if parts & {"progress", "loss"} and not final and now - self._last_draw < 0.25:
                parts = parts - {"progress", "loss"}  # drawn with the next change (a final one always draws)
            else:
                self._last_draw = now
                parts = parts | {"progress", "loss"}
            if "status" in parts or final:
                self._render_status()
            if "progress" in parts:
                self._render_progress()
            if "loss" in parts:
                self._draw_loss()
            if "evals" in parts or final:
                self._draw_metrics()
            if "checkpoint" in parts or final:
                self._show_checkpoint()
            if "reembed" in parts or final:
                self._render_buttons()

    # ------------------------------------------------------------------------------------------ renderers
    def _render_status(self) -> None:
        self._render_buttons()
        w = self._w.get("status")
        if w is None:
            return
        st = self.state
        status = st.status
        color = STATUS_COLORS.get(status, "#555")
        note = ""
        if st.waiting and status in ("running", "stopping"):
            note = (
                '<div class="ccclip-ft-waiting" style="color:#555;font-size:12px">The notebook is waiting in '
                "<code>ft.wait()</code>: buttons answer when it returns. Interrupt the kernel (&#9632;) to stop "
                "now, or wait with <code>await ft.wait_async()</code> to keep Stop working.</div>"
            )
        w.value = (
            f'<span data-status="{escape(status)}" style="color:{color};font-weight:bold">'
            f'{escape(status)}</span> <span class="ccclip-ft-message">{escape(st.message)}</span>{note}'
        )

    def _render_buttons(self) -> None:
        w = self._w
        if not w:
            return
        st = self.state
        busy = st.status in ("running", "stopping")
        w["start"].disabled = busy or st.reembedding
        w["stop"].disabled = not busy or st.status == "stopping" or st.waiting
        w["reembed"].disabled = busy or st.result is None or st.reembedding
        w["reembed"].description = (
            "Re-embedding ..." if st.reembedding else "Re-embed posts with the new model"
        )
        for key in LABELS:
            w[key].disabled = busy
        if not busy:
            self._update_unlock_enabled()

    def _render_progress(self) -> None:
        w = self._w.get("progress")
        if w is None:
            return
        st = self.state
        done, total = st.steps_done, max(1, st.total_steps)
        w.max = total
        w.value = min(total, done)
        self._w["progress_label"].value = f"{done}/{st.total_steps} steps"

    def _render_error(self) -> None:
        w = self._w.get("error")
        if w is None:
            return
        w.value = self.state.error_html
        w.layout.display = "block" if self.state.error is not None else "none"

    def _show_checkpoint(self) -> None:
        w = self._w.get("checkpoint")
        if w is None:
            return
        ck = self.state.checkpoint
        w.value = (
            f'Checkpoint: <code class="ccclip-ft-checkpoint-path">{escape(ck)}</code> '
            '<span style="color:#555">(load it with load_model(path), or ccclip eval --model path)</span>'
            if ck is not None
            else ""
        )

    def _draw_loss(self) -> None:
        fig = self._loss_fig
        if fig is None:
            return
        xs, ys = self.state.loss_points()
        if len(xs) == self._drawn["loss"]:
            return
        with fig.batch_update():
            fig.data[0].x = xs
            fig.data[0].y = ys
        self._drawn["loss"] = len(xs)

    def _draw_metrics(self) -> None:
        fig = self._metric_fig
        if fig is None:
            return
        series = self.state.recall_series()
        n = len(series[0]["x"]) if series else 0
        names = [s["name"] for s in series]
        if [t.name for t in fig.data] == names:
            if n == self._drawn["evals"]:
                return
            with fig.batch_update():
                for trace, s in zip(fig.data, series, strict=True):
                    trace.x, trace.y = s["x"], s["y"]
            self._drawn["evals"] = n
            return
        go = require_plotly()
        ks = list(self.state.curve_ks)
        traces = []
        for s in series:
            chance = s["group"] == "chance"
            traces.append(
                go.Scatter(
                    x=s["x"],
                    y=s["y"],
                    name=s["name"],
                    mode="lines" if chance else "lines+markers",
                    line={
                        "color": SERIES_COLORS.get(s["group"]),
                        "dash": "dash" if chance else _DASHES[ks.index(s["k"]) % len(_DASHES)],
                        "width": 1 if chance else 2,
                    },
                )
            )
        with fig.batch_update():
            fig.data = []
        fig.add_traces(traces)
        self._drawn["evals"] = n

    # ------------------------------------------------------------------------------------------ charts
    @property
    def loss_figure(self) -> Any:
        """The live loss chart (one point per optimizer step)."""
        if self._loss_fig is None:
            go = require_plotly()
            fig = go.FigureWidget()
            fig.add_scatter(x=[], y=[], mode="lines", name="training loss", line={"color": "#333"})
            fig.update_layout(
                title={"text": "training loss"},
                height=300,
                margin={"l": 55, "r": 10, "t": 40, "b": 40},
                xaxis={"title": {"text": "step"}},
                yaxis={"title": {"text": "contrastive loss"}},
                template="plotly_white",
                showlegend=False,
            )
            fig.add_class("ccclip-ft-loss")
            self._loss_fig = fig
            self._drawn["loss"] = -1
            self._draw_loss()
        return self._loss_fig

    @property
    def metrics_figure(self) -> Any:
        """The live Recall@k chart: text to image, per caption kind, with the chance level and a legend."""
        if self._metric_fig is None:
            go = require_plotly()
            fig = go.FigureWidget()
            note = "" if self.state.eval_posts is not None else " (give eval_posts to see it)"
            fig.update_layout(
                title={"text": f"held-out text \u2192 image recall{note}"},
                height=300,
                margin={"l": 55, "r": 10, "t": 40, "b": 40},
                xaxis={"title": {"text": "step"}},
                yaxis={"title": {"text": "Recall@k"}, "range": [0, 1.02]},
                template="plotly_white",
                showlegend=True,
                legend={"orientation": "v", "x": 1.02, "y": 1, "xanchor": "left", "font": {"size": 11}},
            )
            fig.add_class("ccclip-ft-metrics")
            self._metric_fig = fig
            self._drawn["evals"] = -1
            self._draw_metrics()
        return self._metric_fig

    # ------------------------------------------------------------------------------------------ controls
    def _update_unlock_enabled(self) -> None:
        w = self._w
        if w:
            w["unlock_blocks"].disabled = (
                w["trains"].value not in ("lock_image", "lock_text") or self.state.running
            )

    def _sync_controls(self) -> None:
        w = self._w
        if not w:
            return
        self._syncing = True
        try:
            s = self.state.settings
            w["epochs"].value = int(s["epochs"])
            w["max_steps"].value = int(s["max_steps"] or 0)
            w["batch_size"].value = int(s["batch_size"])
            w["lr"].value = float(self.state.shown_lr)
            w["trains"].value = s["trains"]
            w["unlock_blocks"].value = int(s["unlock_blocks"] or 0)
            w["eval_every_steps"].value = int(s["eval_every_steps"] or 0)
            self._update_unlock_enabled()
        finally:
            self._syncing = False

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first access)."""
        if self._widget is None:
            with self._lock:
                self._build()
        return self._widget

    def control(self, key: str) -> Any:
        """The widget of one setting, button or panel by key (``"epochs"``, ``"start"``, ``"status"``...)."""
        self.widget  # noqa: B018 - build first
        return self._w[key]

    def _build(self) -> None:
        widgets = require_widgets()
        st = self.state
        s = st.settings
        w: dict[str, Any] = {}
        box = {"width": "180px"}
        w["epochs"] = widgets.BoundedIntText(value=int(s["epochs"]), min=1, max=10_000, layout=box)
        w["max_steps"] = widgets.BoundedIntText(
            value=int(s["max_steps"] or 0), min=0, max=10_000_000, layout=box
        )
        w["batch_size"] = widgets.BoundedIntText(value=int(s["batch_size"]), min=2, max=65_536, layout=box)
        w["lr"] = widgets.FloatLogSlider(
            value=st.shown_lr,
            base=10,
            min=-7,
            max=-1,
            step=0.05,
            readout_format=".1e",
            layout={"width": "300px"},
        )
        w["trains"] = widgets.Dropdown(
            options=[(label, key) for key, label in _trains().items()],
            value=s["trains"],
            layout={"width": "300px"},
        )
        w["unlock_blocks"] = widgets.BoundedIntText(
            value=int(s["unlock_blocks"] or 0), min=0, max=256, layout=box
        )
        w["eval_every_steps"] = widgets.BoundedIntText(
            value=int(s["eval_every_steps"] or 0), min=0, max=10_000_000, layout=box
        )
        w["start"] = widgets.Button(description="Start", icon="play", button_style="success")
        w["start"].add_class("ccclip-ft-start")
        w["stop"] = widgets.Button(description="Stop", icon="stop", button_style="warning", disabled=True)
        w["stop"].add_class("ccclip-ft-stop")
        w["progress"] = widgets.IntProgress(
            value=0, min=0, max=max(1, st.total_steps), layout={"width": "300px"}
        )
        w["progress"].add_class("ccclip-ft-progress")
        w["progress_label"] = widgets.Label(value="0/0 steps")
        w["progress_label"].add_class("ccclip-ft-progress-label")
        w["status"] = widgets.HTML()
        w["status"].add_class("ccclip-ft-status")
        w["error"] = widgets.HTML(layout={"display": "none"})
        w["error"].add_class("ccclip-ft-error")
        w["checkpoint"] = widgets.HTML()
        w["checkpoint"].add_class("ccclip-ft-checkpoint")
        w["reembed"] = widgets.Button(
            description="Re-embed posts with the new model",
            icon="refresh",
            disabled=True,
            layout={"width": "300px"},
        )
        w["reembed"].add_class("ccclip-ft-reembed")
        self._w = w

        def on_setting(key: str) -> Callable[[Any], None]:
            def handler(change: Any) -> None:
                if self._syncing:
                    return
                value = change["new"]
                st.configure(**{key: (None if key == "max_steps" and not value else value)})

            return handler

        for key in LABELS:
            w[key].observe(on_setting(key), names="value")

        def on_start(_: Any) -> None:
            try:
                st.start(block=False)
            except Exception as exc:  # shown in the panel
                st._fail(exc)

        def on_reembed(_: Any) -> None:
            try:
                st.reembed(block=False)
            except Exception as exc:  # shown in the panel
                st._fail(exc, keep_status=True)

        w["start"].on_click(on_start)
        w["stop"].on_click(lambda _: st.stop())
        w["reembed"].on_click(on_reembed)

        rows = []
        for key, label in LABELS.items():
            lab = widgets.Label(value=label, layout={"width": "270px"})
            row = widgets.HBox([lab, w[key]])
            row.add_class(f"ccclip-ft-setting-{key.replace('_', '-')}")
            rows.append(row)
        settings_box = widgets.VBox([widgets.HTML("<b>Fine-tuning settings</b>"), *rows])
        settings_box.add_class("ccclip-ft-settings")
        n_eval = len(st.eval_posts) if st.eval_posts is not None else "no"
        info = widgets.HTML(
            f'<div style="color:#555">{len(st.train_posts):,} training posts; {n_eval} evaluation posts</div>'
        )
        buttons = widgets.HBox([w["start"], w["stop"], w["progress"], w["progress_label"]])
        buttons.add_class("ccclip-ft-buttons")
        plots = widgets.HBox([self.loss_figure, self.metrics_figure])
        root = widgets.VBox(
            [settings_box, info, buttons, w["status"], w["error"], plots, w["checkpoint"], w["reembed"]]
        )
        root.add_class("ccclip-ft")
        self._widget = root
        self._sync_controls()
        self.update({"status", "progress", "loss", "evals", "error", "checkpoint", "reembed"})


def _trains() -> dict[str, str]:
    from .finetune import TRAINS

    return TRAINS
