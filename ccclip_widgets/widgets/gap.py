"""The Gap view: how well captions find their images, descriptive against commentative, model against model.

:class:`Gap` is a plain Python object that holds the models to compare (``{name: Embeddings}``) and builds its
ipywidgets lazily. It shows

* a grouped bar chart of text-to-image (or image-to-text) Recall@k per model, one bar per caption kind
  (``descriptive``, ``commentative``), with 95% bootstrap confidence intervals as error bars;
* a table per group (caption kind x language by default) with R@1/5/10 and their intervals for every model;
* a "try a caption" box: type a caption and see the top images under each model side by side.

Everything is computed with :func:`ccclip_widgets.evaluate.evaluate_retrieval` and
:func:`ccclip_widgets.embed.encode_texts`; the widget only draws. Connected to a
:class:`~ccclip_widgets.widgets.finetune.FineTune` panel (:meth:`Gap.connect`), the view follows a running
fine-tune: every evaluation during training replaces the fine-tuned model's bars, and re-embedding the posts with
the finished model adds it for the caption box too.

Example
-------
>>> gap = Gap({"stock": before}, clip_models={"stock": model})  # doctest: +SKIP
>>> gap.add_model("fine-tuned", after, tuned)  # doctest: +SKIP
>>> gap.set_k(10).set_group_by("caption_kind", "lang")  # doctest: +SKIP
>>> gap  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ._common import ThumbnailCache, escape, require_plotly, require_widgets, truncate

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..models import ClipModel

log = logging.getLogger(__name__)

__all__ = ["CAPTION_KIND_COLORS", "DIRECTION_LABELS", "Gap"]

#: Bar colors of the caption kinds (others get plotly's default cycle).
CAPTION_KIND_COLORS: dict[str, str] = {
    "descriptive": "#4C78A8",
    "commentative": "#F58518",
    "all posts": "#54A24B",
}
#: Human labels of the evaluation directions.
DIRECTION_LABELS: dict[str, str] = {
    "text_to_image": "text \u2192 image",
    "image_to_text": "image \u2192 text",
}
#: Columns never offered for grouping (plumbing or per-post values).
_NOT_GROUPS = frozenset(
    {"post_id", "image", "image_path", "image_bytes", "text", "image_key", "text_key", "row", "timestamp"}
)
_KS = (1, 5, 10)


@dataclass
class _Entry:
    """One model in the view: its vectors (aligned with ``table``), optionally the model and a version tag."""

    name: str
    image: np.ndarray
    text: np.ndarray
    table: pl.DataFrame
    model: ClipModel | None
    version: int
    note: str = ""


class Gap:
    """Retrieval gap between descriptive and commentative captions, for one or several models.

    Parameters
    ----------
    models
        ``{name: Embeddings}`` (from :func:`ccclip_widgets.embed_posts`), e.g. ``{"stock": before,
        "fine-tuned": after}``. More can be added with :meth:`add_model`.
    clip_models
        ``{name: ClipModel}`` used by the "try a caption" box to encode typed captions; models without one are
        shown in the chart and table only.
    group_by
        Columns for the table (missing ones are skipped); the chart always splits by ``caption_kind``.
    k
        The Recall@k shown in the chart: 1, 5 or 10.
    direction
        ``"text_to_image"`` (a caption looks for its image; the C-CLIP question) or ``"image_to_text"``.
    split
        Evaluate only posts whose ``split`` column equals this (e.g. ``"test"``); ``None`` uses every post.
    pool
        Candidate pool per group, passed to :func:`~ccclip_widgets.evaluate.evaluate_retrieval`: ``"group"``
        (a group's own posts) or ``"all"``.
    n_boot, seed
        Bootstrap resamples and seed of the confidence intervals.
    top_n
        Images shown per model in the caption box.
    thumb_size
        Thumbnail size in pixels.

    Attributes
    ----------
    caption_results
        ``{model name: polars.DataFrame}`` of the last :meth:`try_caption` (columns ``rank``, ``post_id``,
        ``image_key``, ``score``, ``text``).
    """

    def __init__(
        self,
        models: Mapping[str, Embeddings] | None = None,
        *,
        clip_models: Mapping[str, ClipModel] | None = None,
        group_by: Sequence[str] = ("caption_kind", "lang"),
        k: int = 5,
        direction: str = "text_to_image",
        split: str | None = None,
        pool: str = "group",
        n_boot: int = 1000,
        seed: int = 0,
        top_n: int = 5,
        thumb_size: int = 96,
    ) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._selected: list[str] | None = None  # None: every model
        self._group_by: tuple[str, ...] = tuple(group_by)
        self._k = self._check_k(k)
        self._direction = self._check_direction(direction)
        self._split = split
        self._pool = pool
        self._n_boot = int(n_boot)
        self._seed = int(seed)
        self.top_n = int(top_n)
        self.thumb_size = int(thumb_size)
        self._cache: dict[tuple[Any, ...], pl.DataFrame] = {}
        self._version = 0
        self._thumbs = ThumbnailCache(maxsize=256)
        self.caption_results: dict[str, pl.DataFrame] = {}
        self._last_caption: str | None = None
        self._status = ""
        self._connections: list[tuple[Any, list[tuple[str, Callable[..., Any]]]]] = []
        # widgets, built on first use
        self._widget: Any = None
        self._figure: Any = None
        self._w: dict[str, Any] = {}
        self._syncing = False
        clip_models = dict(clip_models or {})
        for name, emb in (models or {}).items():
            self.add_model(name, emb, clip_models.get(name))

    # ------------------------------------------------------------------------------------------------ models
    def add_model(
        self, name: str, embeddings: Embeddings | Any, model: ClipModel | None = None, *, note: str = ""
    ) -> Gap:
        """Add a model (or replace the one with that name) and refresh the view.

        Parameters
        ----------
        name
            Label in the chart, table and caption box.
        embeddings
            An :class:`~ccclip_widgets.embed.Embeddings` (or any object with ``image``, ``text`` and ``posts``
            whose ``table`` is a posts table aligned with the vectors).
        model
            The :class:`~ccclip_widgets.models.ClipModel` that made the vectors; needed by :meth:`try_caption`.
        note
            Short text shown next to the name in the table header (e.g. ``"step 40"``).

        Returns
        -------
        Gap
            ``self``, for chaining.
        """
        table = embeddings.posts.table if hasattr(embeddings, "posts") else embeddings.table
        image = np.asarray(embeddings.image, dtype=np.float32)
        text = np.asarray(embeddings.text, dtype=np.float32)
        if image.shape[0] != table.height or text.shape[0] != table.height:
            raise ValueError(
                f"model {name!r}: {image.shape[0]} image and {text.shape[0]} text vectors for {table.height} posts"
            )
        if self._split is not None:
            if "split" not in table.columns:
                raise ValueError(
                    f"split={self._split!r} was asked for but the posts of {name!r} have no split column"
                )
            mask = (table["split"] == self._split).fill_null(False).to_numpy()
            table, image, text = table.filter(pl.Series(mask)), image[mask], text[mask]
            if table.height == 0:
                raise ValueError(f"model {name!r}: no posts with split == {self._split!r}")
        with self._lock:
            self._version += 1
            self._entries[name] = _Entry(name, image, text, table, model, self._version, note)
            if self._selected is not None and name not in self._selected:
                self._selected.append(name)
        self._refresh(caption=True)
        return self

    def remove_model(self, name: str) -> Gap:
        """Remove a model from the view.

        Parameters
        ----------
        name
            Its name.

        Returns
        -------
        Gap
            ``self``.
        """
        with self._lock:
            self._entries.pop(name, None)
            if self._selected is not None and name in self._selected:
                self._selected.remove(name)
            self.caption_results.pop(name, None)
        self._refresh(caption=True)
        return self

    def set_clip_model(self, name: str, model: ClipModel | None) -> Gap:
        """Attach the model that encodes typed captions for ``name`` (for :meth:`try_caption`).

        Returns
        -------
        Gap
            ``self``.
        """
        with self._lock:
            self._entry(name).model = model
        return self

    @property
    def models(self) -> list[str]:
        """Names of every model in the view, in the order they were added."""
        with self._lock:
            return list(self._entries)

    @property
    def selected(self) -> list[str]:
        """Names of the models shown (all by default)."""
        with self._lock:
            if self._selected is None:
                return list(self._entries)
            return [n for n in self._selected if n in self._entries]

    def select(self, *names: str) -> Gap:
        """Show only these models (no names: show every model).

        Returns
        -------
        Gap
            ``self``.
        """
        with self._lock:
            for n in names:
                self._entry(n)
            self._selected = list(names) if names else None
        self._refresh()
        return self

    # ------------------------------------------------------------------------------------------------ settings
    def set_group_by(self, *columns: str) -> Gap:
        """Group the table by these columns (e.g. ``"caption_kind", "lang"``); missing columns are skipped.

        Returns
        -------
        Gap
            ``self``.
        """
        self._group_by = tuple(columns)
        self._refresh()
        return self

    @property
    def group_by(self) -> tuple[str, ...]:
        """The grouping columns of the table that the posts actually have."""
        with self._lock:
            cols: set[str] = set()
            for e in self._entries.values():
                cols |= set(e.table.columns)
        return tuple(c for c in self._group_by if c in cols) if cols else self._group_by

    def set_k(self, k: int) -> Gap:
        """Show Recall@``k`` (1, 5 or 10) in the chart.

        Returns
        -------
        Gap
            ``self``.
        """
        self._k = self._check_k(k)
        self._refresh()
        return self

    @property
    def k(self) -> int:
        """The Recall@k shown in the chart."""
        return self._k

    def set_direction(self, direction: str) -> Gap:
        """Show ``"text_to_image"`` or ``"image_to_text"`` retrieval.

        Returns
        -------
        Gap
            ``self``.
        """
        self._direction = self._check_direction(direction)
        self._refresh()
        return self

    @property
    def direction(self) -> str:
        """The retrieval direction shown in the chart and the HTML table."""
        return self._direction

    @staticmethod
    def _check_k(k: int) -> int:
        if int(k) not in _KS:
            raise ValueError(f"k must be one of {_KS}, got {k!r}")
        return int(k)

    @staticmethod
    def _check_direction(direction: str) -> str:
        if direction not in DIRECTION_LABELS:
            raise ValueError(f"direction must be one of {tuple(DIRECTION_LABELS)}, got {direction!r}")
        return direction

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"no model named {name!r} in this Gap view; it has {list(self._entries)}"
            ) from None

    # ------------------------------------------------------------------------------------------------ results
    def _evaluate(self, entry: _Entry, group_by: tuple[str, ...]) -> pl.DataFrame:
        from ..evaluate import evaluate_retrieval

        gcols = tuple(c for c in group_by if c in entry.table.columns)
        key = (entry.name, entry.version, gcols, self._pool, self._n_boot, self._seed)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        df = evaluate_retrieval(
            {entry.name: (entry.image, entry.text)},
            entry.table,
            group_by=gcols,
            ks=_KS,
            n_boot=self._n_boot,
            seed=self._seed,
            pool=self._pool,  # type: ignore[arg-type]
        )
        with self._lock:
            # keep only the newest version of each model
            for old in [k for k in self._cache if k[0] == entry.name and k[1] != entry.version]:
                del self._cache[old]
            self._cache[key] = df
        return df

    def _combined(self, group_by: tuple[str, ...]) -> pl.DataFrame:
        with self._lock:
            entries = [self._entries[n] for n in self.selected]
        frames = [self._evaluate(e, group_by) for e in entries]
        if not frames:
            return pl.DataFrame(schema={"model": pl.String, "direction": pl.String})
        return pl.concat(frames, how="diagonal_relaxed")

    @property
    def table(self) -> pl.DataFrame:
        """The evaluation shown: :func:`~ccclip_widgets.evaluate.evaluate_retrieval` of every shown model.

        One :func:`evaluate_retrieval` call per model (its vectors and posts, grouped by :attr:`group_by`, both
        directions, R@1/5/10 with bootstrap intervals), concatenated in model order.
        """
        return self._combined(self.group_by)

    @property
    def chart_table(self) -> pl.DataFrame:
        """The numbers behind the chart: evaluation by ``caption_kind`` only, for the shown direction."""
        df = self._combined(("caption_kind",))
        if df.height == 0:
            return df
        df = df.filter(pl.col("direction") == self._direction)
        if "caption_kind" not in df.columns:
            df = df.with_columns(pl.lit("all posts").alias("caption_kind"))
        return df.with_columns(pl.col("caption_kind").cast(pl.String).fill_null("unlabeled"))

    # ------------------------------------------------------------------------------------------------ caption box
    def try_caption(self, caption: str, top_n: int | None = None) -> dict[str, pl.DataFrame]:
        """Search every shown model's images with a typed caption.

        Each model encodes ``caption`` with its own :class:`~ccclip_widgets.models.ClipModel` and ranks the unique
        images of its posts by cosine similarity; posts that share an image appear once (the first such post).

        Parameters
        ----------
        caption
            The caption to search with.
        top_n
            Images per model (default :attr:`top_n`).

        Returns
        -------
        dict
            ``{model name: polars.DataFrame}`` with columns ``rank``, ``post_id``, ``image_key``, ``score``,
            ``text``; also stored in :attr:`caption_results`. Models without a ClipModel are left out.
        """
        from ..embed import encode_texts

        caption = str(caption).strip()
        n = int(top_n or self.top_n)
        with self._lock:
            entries = [self._entries[name] for name in self.selected]
        results: dict[str, pl.DataFrame] = {}
        if caption:
            for e in entries:
                if e.model is None:
                    continue
                q = encode_texts(e.model, [caption])[0]
                results[e.name] = _top_images(e, q, n)
        with self._lock:
            self.caption_results = results
            self._last_caption = caption
        self._render_caption()
        return results

    # ------------------------------------------------------------------------------------------------ live link
    def connect(self, finetune: Any, name: str = "fine-tuned", *, live: bool = True) -> Gap:
        """Follow a :class:`~ccclip_widgets.widgets.finetune.FineTune` panel.

        During training every evaluation of the model being trained replaces the bars of ``name`` (when the
        panel has evaluation posts); when the posts are re-embedded with the finished model, ``name`` gets
        those embeddings and the model, so the caption box uses it too. For a like-for-like comparison give the
        panel the same posts as the other models here (its ``eval_posts`` during training, its ``posts`` when
        re-embedding).

        Parameters
        ----------
        finetune
            The panel (anything with ``on_live_embeddings(callback)`` and ``on_reembedded(callback)``).
        name
            The label of the fine-tuned model in this view.
        live
            Follow the evaluations during training (not only the re-embedded result).

        Returns
        -------
        Gap
            ``self``.
        """

        def on_live(embeddings: Any, info: Any = None) -> None:
            step = getattr(info, "step", None) if info is not None else None
            self.add_model(name, embeddings, None, note=f"step {step}" if step is not None else "training")
            self.set_status(
                f"{name}: live evaluation at step {step}" if step is not None else f"{name}: updated"
            )

        def on_reembedded(embeddings: Any, model: Any = None) -> None:
            self.add_model(name, embeddings, model)
            self.set_status(f"{name}: re-embedded with the fine-tuned checkpoint")

        hooks: list[tuple[str, Callable[..., Any]]] = []
        if live and hasattr(finetune, "on_live_embeddings"):
            finetune.on_live_embeddings(on_live)
            hooks.append(("on_live_embeddings", on_live))
        finetune.on_reembedded(on_reembedded)
        hooks.append(("on_reembedded", on_reembedded))
        self._connections.append((finetune, hooks))
        return self

    def disconnect(self, finetune: Any | None = None) -> Gap:
        """Stop following ``finetune`` (default: every connected panel).

        Returns
        -------
        Gap
            ``self``.
        """
        keep = []
        for ft, hooks in self._connections:
            if finetune is None or ft is finetune:
                for method, cb in hooks:
                    getattr(ft, method)(cb, remove=True)
            else:
                keep.append((ft, hooks))
        self._connections = keep
        return self

    def set_status(self, text: str) -> Gap:
        """Show a one-line status under the chart.

        Returns
        -------
        Gap
            ``self``.
        """
        self._status = str(text)
        w = self._w.get("status")
        if w is not None:
            w.value = f'<span style="color:#555">{escape(self._status)}</span>'
        return self

    # ------------------------------------------------------------------------------------------------ widgets
    @property
    def figure(self) -> Any:
        """The bar chart (a plotly ``FigureWidget``): one trace per caption kind, one bar group per model."""
        if self._figure is None:
            go = require_plotly()
            fig = go.FigureWidget()
            fig.update_layout(
                barmode="group",
                height=360,
                margin={"l": 50, "r": 20, "t": 50, "b": 40},
                xaxis={"type": "category", "title": {"text": "model"}},
                yaxis={"range": [0, 1.05], "title": {"text": "Recall@k"}},
                legend={"title": {"text": "caption kind"}},
                template="plotly_white",
            )
            fig.add_class("ccclip-gap-chart")
            self._figure = fig
            self._update_figure()
        return self._figure

    def _update_figure(self) -> None:
        fig = self._figure
        if fig is None:
            return
        df = self.chart_table
        k = self._k
        models = self.selected
        kinds = _kind_order(df["caption_kind"].to_list()) if df.height else []
        traces = []
        for kind in kinds:
            rows = {r["model"]: r for r in df.filter(pl.col("caption_kind") == kind).iter_rows(named=True)}
            xs = [m for m in models if m in rows]
            y = [_num(rows[m][f"r_at_{k}"]) for m in xs]
            lo = [_num(rows[m][f"r_at_{k}_lo"]) for m in xs]
            hi = [_num(rows[m][f"r_at_{k}_hi"]) for m in xs]
            custom = [[rows[m]["n_queries"], rows[m]["pool_size"], lo[i], hi[i]] for i, m in enumerate(xs)]
            traces.append(
                {
                    "name": kind,
                    "x": xs,
                    "y": y,
                    "error_y": {
                        "type": "data",
                        "symmetric": False,
                        "array": [max(0.0, h - v) for h, v in zip(hi, y)],
                        "arrayminus": [max(0.0, v - lo_) for lo_, v in zip(lo, y)],
                        "visible": True,
                        "thickness": 1.5,
                        "width": 6,
                    },
                    "customdata": custom,
                    "marker": {"color": CAPTION_KIND_COLORS.get(kind)},
                    "hovertemplate": (
                        f"%{{x}} \u00b7 {kind}<br>R@{k} = %{{y:.3f}} [%{{customdata[2]:.3f}}, "
                        "%{customdata[3]:.3f}]<br>%{customdata[0]} queries, pool %{customdata[1]}<extra></extra>"
                    ),
                }
            )
        title = f"{DIRECTION_LABELS[self._direction]} retrieval: R@{k} with 95% CI"
        if self._split:
            title += f" ({self._split} posts)"
        names = [t.name for t in fig.data]
        if names == [t["name"] for t in traces]:
            with fig.batch_update():
                for trace, spec in zip(fig.data, traces):
                    trace.update(spec)
                fig.layout.title.text = title
                fig.layout.yaxis.title.text = f"R@{k}"
        else:
            go = require_plotly()
            with fig.batch_update():
                fig.data = []
                fig.layout.title.text = title
                fig.layout.yaxis.title.text = f"R@{k}"
            fig.add_traces([go.Bar(**spec) for spec in traces])

    def _render_table(self) -> None:
        w = self._w.get("table")
        if w is None:
            return
        w.value = _table_html(self.table, self.group_by, self._direction, self._k, self._notes())

    def _notes(self) -> dict[str, str]:
        with self._lock:
            return {n: e.note for n, e in self._entries.items() if e.note}

    def _render_caption(self) -> None:
        w = self._w.get("results")
        if w is None:
            return
        with self._lock:
            results = dict(self.caption_results)
            caption = self._last_caption
            entries = {n: self._entries[n] for n in self.selected}
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
                img = self._thumbs.img_html(post, self.thumb_size)
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

    def _refresh(self, caption: bool = False) -> None:
        """Recompute what is shown (only the parts that exist) and sync the controls."""
        if self._widget is None and self._figure is None:
            return
        self._sync_controls()
        self._update_figure()
        self._render_table()
        if caption and self._last_caption:
            self.try_caption(self._last_caption)

    def _group_options(self) -> list[str]:
        with self._lock:
            tables = [e.table for e in self._entries.values()]
        opts: dict[str, None] = {}
        for t in tables:
            for c, dt in t.schema.items():
                if c in _NOT_GROUPS:
                    continue
                if dt in (pl.String, pl.Categorical, pl.Boolean) or dt.is_integer():
                    opts.setdefault(c, None)
        for c in self._group_by:
            opts.setdefault(c, None)
        return list(opts)

    def _sync_controls(self) -> None:
        if not self._w:
            return
        self._syncing = True
        try:
            w = self._w
            w["models"].options = self.models
            w["models"].value = tuple(self.selected)
            opts = self._group_options()
            w["group_by"].options = opts
            w["group_by"].value = tuple(c for c in self._group_by if c in opts)
            w["k"].value = f"R@{self._k}"
            w["direction"].value = self._direction
        finally:
            self._syncing = False

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first access)."""
        if self._widget is None:
            self._build()
        return self._widget

    def _build(self) -> None:
        widgets = require_widgets()
        fig = self.figure
        w: dict[str, Any] = {}
        w["models"] = widgets.SelectMultiple(
            options=self.models, value=tuple(self.selected), description="models", rows=3
        )
        opts = self._group_options()
        w["group_by"] = widgets.SelectMultiple(
            options=opts, value=tuple(c for c in self._group_by if c in opts), description="group by", rows=3
        )
        w["k"] = widgets.ToggleButtons(
            options=[f"R@{k}" for k in _KS], value=f"R@{self._k}", description="metric"
        )
        w["k"].style.button_width = "56px"
        w["direction"] = widgets.ToggleButtons(
            options=[(label, key) for key, label in DIRECTION_LABELS.items()], value=self._direction
        )
        w["direction"].style.button_width = "110px"
        w["table"] = widgets.HTML()
        w["table"].add_class("ccclip-gap-table")
        w["status"] = widgets.HTML(f'<span style="color:#555">{escape(self._status)}</span>')
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
                with self._lock:
                    self._selected = list(change["new"])
                self._refresh(caption=True)

        def on_group(change: Any) -> None:
            if not self._syncing:
                self.set_group_by(*change["new"])

        def on_k(change: Any) -> None:
            if not self._syncing:
                self.set_k(int(str(change["new"]).split("@")[1]))

        def on_direction(change: Any) -> None:
            if not self._syncing:
                self.set_direction(change["new"])

        def on_search(_: Any = None) -> None:
            try:
                self.try_caption(w["caption"].value)
            except Exception as exc:  # show the problem in the panel, not only in the log
                message = f"{escape(type(exc).__name__)}: {escape(exc)}"
                w["results"].value = f'<div style="color:#b00">{message}</div>'

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
        box = widgets.VBox([controls, chart_box, w["status"], w["table"], try_box])
        box.add_class("ccclip-gap")
        self._widget = box
        self._render_table()
        self._render_caption()

    def show(self) -> Any:
        """Display the widget (in Jupyter) and return it."""
        from IPython.display import display

        display(self.widget)
        return self.widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (
            f"Gap(models={self.models}, group_by={self.group_by}, k={self._k}, direction={self._direction!r})"
        )


# ---------------------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _kind_order(kinds: Iterable[Any]) -> list[str]:
    present = list(dict.fromkeys(str(k) for k in kinds))
    first = [k for k in ("descriptive", "commentative") if k in present]
    return first + [k for k in present if k not in first]


def _top_images(entry: _Entry, query: np.ndarray, n: int) -> pl.DataFrame:
    """The ``n`` best unique images of ``entry`` for a unit query vector (first post of each image)."""
    scores = entry.image @ np.asarray(query, dtype=np.float32)
    keys = (
        entry.table["image_key"].to_list() if "image_key" in entry.table.columns else entry.table["post_id"]
    )
    order = np.argsort(-scores, kind="stable")
    seen: set[Any] = set()
    picked: list[int] = []
    for i in order.tolist():
        if keys[i] in seen:
            continue
        seen.add(keys[i])
        picked.append(i)
        if len(picked) >= n:
            break
    sub = entry.table[picked] if picked else entry.table.head(0)
    return pl.DataFrame(
        {
            "rank": pl.Series(list(range(1, len(picked) + 1)), dtype=pl.Int64),
            "post_id": sub["post_id"].cast(pl.String),
            "image_key": pl.Series([str(keys[i]) for i in picked], dtype=pl.String),
            "score": pl.Series(scores[picked].astype(np.float64) if picked else [], dtype=pl.Float64),
            "text": sub["text"].cast(pl.String),
        }
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


def _table_html(
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
        head1 += f'<th {th} colspan={len(_KS)} data-model="{escape(m)}">{label}</th>'
    head2 = "".join(f"<th {th}>R@{kk}</th>" for _ in models for kk in _KS)
    body = []
    for key, per_model in by_key.items():
        ref = next(iter(per_model.values()))
        cells = "".join(f'<td style="padding:2px 8px">{escape(v)}</td>' for v in key)
        cells += f'<td style="padding:2px 8px">{ref["n_queries"]}</td><td style="padding:2px 8px">{ref["pool_size"]}</td>'
        for m in models:
            r = per_model.get(m)
            cells += "".join(_ci_cell(r, kk, kk == k) if r else "<td>-</td>" for kk in _KS)
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
