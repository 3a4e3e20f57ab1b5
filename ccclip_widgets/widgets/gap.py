"""The Gap view: how well captions find their images, descriptive against commentative, model against model.

:class:`Gap` is the view's state: a plain Python object (no widget import) that holds the models to compare
(``{name: Embeddings}``), the settings, the evaluation and what the chart shows (:meth:`Gap.chart_spec`). Its
widgets (:mod:`._gap_view`, built on first use of :attr:`Gap.widget`) draw

* grouped bars of text-to-image (or image-to-text) Recall@k per caption kind and language, one bar per model
  (before / after), with 95% bootstrap confidence intervals and the chance level, and a legend;
* a table per group (caption kind x language by default) with R@1/5/10 and their intervals for every model;
* a "try a caption" box: type a caption and see the top images under each model side by side.

Every group is ranked against the same candidates, all the posts shown (``pool="all"``), so groups share one
chance level and a small group cannot look better just because it has fewer images to choose from. Everything is
computed with :func:`ccclip_widgets.evaluate.evaluate_retrieval` (the toolkit's one metrics engine; the chart and
table numbers are built in :mod:`._gap_metrics`) and :func:`ccclip_widgets.embed.encode_texts`; the view only
draws. Connected to a :class:`~ccclip_widgets.widgets.finetune.FineTune` panel (:meth:`Gap.connect`), the view
follows a running fine-tune: every evaluation during training replaces the fine-tuned model's bars, and
re-embedding the posts with the finished model adds it for the caption box too.

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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ._common import ViewDisplay, register_callback
from ._gap_metrics import DIRECTION_LABELS, KS, MODEL_COLORS, GapResults, ModelEntry

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..embed import Embeddings
    from ..models import ClipModel

log = logging.getLogger(__name__)

__all__ = ["DIRECTION_LABELS", "MODEL_COLORS", "Gap"]


class Gap(GapResults, ViewDisplay):
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
        Columns for the table (missing ones are skipped).
    chart_by
        Columns whose values make the chart's bar groups, outer first (missing ones are skipped): by default
        caption kind, then language, so every language appears in the chart.
    k
        The Recall@k shown in the chart: 1, 5 or 10.
    direction
        ``"text_to_image"`` (a caption looks for its image; the C-CLIP question) or ``"image_to_text"``.
    split
        Evaluate only posts whose ``split`` column equals this (e.g. ``"test"``); ``None`` uses every post.
    pool
        Candidate pool per group, passed to :func:`~ccclip_widgets.evaluate.evaluate_retrieval`: ``"all"`` (the
        default: every group against all the posts) or ``"group"`` (a group's own posts).
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
        chart_by: Sequence[str] = ("caption_kind", "lang"),
        k: int = 5,
        direction: str = "text_to_image",
        split: str | None = None,
        pool: str = "all",
        n_boot: int = 1000,
        seed: int = 0,
        top_n: int = 5,
        thumb_size: int = 96,
    ) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._selected: list[str] | None = None  # None: every model
        self._group_by: tuple[str, ...] = tuple(group_by)
        self._chart_by: tuple[str, ...] = tuple(chart_by)
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
        self.caption_results: dict[str, pl.DataFrame] = {}
        self._last_caption: str | None = None
        self._status = ""
        self._connections: list[tuple[Any, list[tuple[str, Callable[..., Any]]]]] = []
        self._listeners: list[Callable[[set[str]], Any]] = []
        self._view: Any = None
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
            self._entries[name] = ModelEntry(name, image, text, table, model, self._version, note)
            if self._selected is not None and name not in self._selected:
                self._selected.append(name)
        self._changed("models")
        self._rerun_caption()
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
        self._changed("models")
        self._rerun_caption()
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
        self._changed("settings")
        self._rerun_caption()
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
        self._changed("settings")
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
        self._changed("settings")
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
        self._changed("settings")
        return self

    @property
    def direction(self) -> str:
        """The retrieval direction shown in the chart and the HTML table."""
        return self._direction

    def set_chart_by(self, *columns: str) -> Gap:
        """Make the chart's bar groups from these columns, outer first (e.g. ``"caption_kind", "lang"``).

        Returns
        -------
        Gap
            ``self``.
        """
        self._chart_by = tuple(columns)
        self._changed("settings")
        return self

    @property
    def chart_by(self) -> tuple[str, ...]:
        """The chart's grouping columns that the posts actually have (at most two)."""
        with self._lock:
            cols: set[str] = set()
            for e in self._entries.values():
                cols |= set(e.table.columns)
        return tuple(c for c in self._chart_by if c in cols)[:2]

    @staticmethod
    def _check_k(k: int) -> int:
        if int(k) not in KS:
            raise ValueError(f"k must be one of {KS}, got {k!r}")
        return int(k)

    @staticmethod
    def _check_direction(direction: str) -> str:
        if direction not in DIRECTION_LABELS:
            raise ValueError(f"direction must be one of {tuple(DIRECTION_LABELS)}, got {direction!r}")
        return direction

    def _entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"no model named {name!r} in this Gap view; it has {list(self._entries)}"
            ) from None

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
        self._changed("caption")
        return results

    def _rerun_caption(self) -> None:
        """After the models changed, search the last caption again so the caption box matches them."""
        if self._last_caption:
            try:
                self.try_caption(self._last_caption)
            except Exception:  # the caption box shows its own errors; the models changed regardless
                log.exception("re-running the caption search failed")
        else:
            self._changed("caption")

    def _notes(self) -> dict[str, str]:
        with self._lock:
            return {n: e.note for n, e in self._entries.items() if e.note}

    # ------------------------------------------------------------------------------------------------ view
    def on_change(self, callback: Callable[[set[str]], Any], remove: bool = False) -> Gap:
        """Call ``callback(parts)`` when what is shown changes (``models``, ``settings``, ``caption``, ``status``):
        the view's one update path. Returns ``self``."""
        with self._lock:
            register_callback(self._listeners, callback, remove)
        return self

    def _changed(self, *parts: str) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(set(parts))
            except Exception:
                log.exception("a Gap view listener failed")

    @property
    def view(self) -> Any:
        """The :class:`~ccclip_widgets.widgets._gap_view.GapView` (built on first use)."""
        if self._view is None:
            from ._gap_view import GapView

            self._view = GapView(self)
        return self._view

    @property
    def figure(self) -> Any:
        """The bar chart (a plotly ``FigureWidget``)."""
        return self.view.figure

    def __repr__(self) -> str:
        return (
            f"Gap(models={self.models}, group_by={self.group_by}, k={self._k}, direction={self._direction!r})"
        )

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
        self._changed("status")
        return self

    @property
    def status(self) -> str:
        """The one-line status under the chart."""
        return self._status


# ---------------------------------------------------------------------------------------------------- helpers
def _top_images(entry: ModelEntry, query: np.ndarray, n: int) -> pl.DataFrame:
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
