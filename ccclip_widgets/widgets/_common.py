"""Small helpers shared by the widgets: optional imports, thumbnails as ``<img>`` data URIs, post cards.

Everything here is plain Python that returns strings or modules, so it is easy to test without a browser:

* :func:`require_widgets` / :func:`require_plotly` import the optional dependencies or raise an ``ImportError``
  naming the exact install command (:data:`INSTALL_HINT`);
* :class:`ThumbnailCache` turns one post's image into a small ``<img src="data:...">`` tag on demand and keeps the
  most recent ones (thumbnails are never made for all posts up front);
* :func:`post_card_html` renders one post (image, text, metadata) as an HTML fragment;
* :func:`escape`, :func:`truncate`, :func:`image_source` and :func:`metadata_items` are the pieces they use;
* :func:`register_callback` is the ``on_<event>(callback, remove=False)`` contract.

The widget convention (every widget here follows it; the Explorer is the reference)
---------------------------------------------------------------------------------
* **State and view.** A widget is a plain Python state object (``explorer_state.ExplorerState``) that never imports
  ipywidgets or plotly, and a view (``_explorer_view.ExplorerView``) that renders it. The public class
  (``Explorer``) is the state with the view attached: tests and scripts use it with no Jupyter at all.
* **One update path.** Every setter goes through the state's ``_update(source=None, **changes)``, which stores
  the values, recomputes what depends on them, then calls the ``on_change(parts, source)`` listeners (the view)
  before the user's callbacks. Setters return ``self`` so calls chain.
* **The UI handle.** ``.widget`` is a property that builds the view on first access and returns its root
  ipywidget; ``.view`` is the view object or ``None`` before that; ``_repr_mimebundle_`` delegates to
  ``.widget``, so ending a cell with the object displays it. Named sub-widgets are in ``.panels`` (a dict).
  Nothing else holds widgets, and no state method checks whether a view exists: it just notifies listeners.
* **Callbacks.** ``on_<event>(callback, remove=False)`` registers once (or removes) with
  :func:`register_callback` and returns ``self``; UI-triggered actions run through a ``_guard`` that shows an
  error in the status line instead of losing it in a log.
* **Progress.** Slow construction steps run inside ``progress.phase(text)`` of a reporter; in a notebook
  ``_progress.WidgetProgress`` shows them as one line in the cell's output with the backend's tqdm bars under it.
"""

from __future__ import annotations

import html
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "ViewDisplay",
    "INSTALL_HINT",
    "INTERNAL_COLUMNS",
    "ThumbnailCache",
    "escape",
    "image_source",
    "metadata_items",
    "placeholder_html",
    "post_card_html",
    "preload_plotly",
    "require_plotly",
    "require_widgets",
    "truncate",
]

#: The command that installs every optional dependency of the widgets.
INSTALL_HINT = 'pip install "ccclip_widgets[widgets]"'

#: Columns of ``Posts.table`` that are plumbing, not metadata worth showing to an analyst.
INTERNAL_COLUMNS: frozenset[str] = frozenset(
    {"post_id", "image", "image_path", "image_bytes", "text", "image_key", "text_key", "row"}
)

_FIGUREWIDGET_MODULE = "plotly.graph_objs._figurewidget"
_preload_lock = threading.Lock()
_preload_thread: threading.Thread | None = None


# ------------------------------------------------------------------------------------------ optional imports
def _missing(what: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"The ccclip_widgets widgets need {what}, which is not installed ({exc}). {INSTALL_HINT}"
    )


def require_widgets() -> ModuleType:
    """Import and return :mod:`ipywidgets`.

    Returns
    -------
    module
        The ``ipywidgets`` module.

    Raises
    ------
    ImportError
        When ipywidgets is missing; the message holds :data:`INSTALL_HINT`.
    """
    try:
        import ipywidgets
    except ImportError as exc:
        raise _missing("ipywidgets", exc) from exc
    return ipywidgets


def require_plotly() -> ModuleType:
    """Import and return :mod:`plotly.graph_objects` with its ``FigureWidget`` usable.

    Returns
    -------
    module
        ``plotly.graph_objects``.

    Raises
    ------
    ImportError
        When plotly or anywidget (which ``FigureWidget`` needs) is missing; the message holds :data:`INSTALL_HINT`.
    """
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise _missing("plotly", exc) from exc
    try:
        import anywidget  # noqa: F401 - FigureWidget is an anywidget; without it plotly substitutes a stub

        go.FigureWidget  # noqa: B018 - resolve the lazy attribute now, so a failure surfaces here
    except ImportError as exc:
        raise _missing("anywidget (for plotly's FigureWidget)", exc) from exc
    return go


def preload_plotly() -> None:
    """Start importing plotly's ``FigureWidget`` in a background thread, once.

    The first import of ``FigureWidget`` costs several seconds on a small machine (plotly pulls in nbformat and
    jsonschema). A widget whose constructor first spends seconds in backend calls (index, projection) can call
    this at its start so the import overlaps that work. Safe to call many times; does nothing when the module
    is already imported or the dependencies are missing (the real import reports that later).
    """
    global _preload_thread
    if _FIGUREWIDGET_MODULE in sys.modules:
        return
    with _preload_lock:
        if _preload_thread is not None:
            return

        def work() -> None:
            try:
                import anywidget  # noqa: F401
                import plotly.graph_objs._figurewidget  # noqa: F401
            except Exception:
                log.debug("background import of plotly failed", exc_info=True)

        _preload_thread = threading.Thread(target=work, name="ccclip-preload-plotly", daemon=True)
        _preload_thread.start()


# ------------------------------------------------------------------------------------------ text helpers
def escape(value: Any) -> str:
    """HTML-escape ``str(value)`` (quotes included), mapping ``None`` to an empty string."""
    return "" if value is None else html.escape(str(value), quote=True)


def truncate(text: Any, limit: int = 120) -> str:
    """Shorten ``text`` to at most ``limit`` characters, ending with an ellipsis when cut.

    Parameters
    ----------
    text
        Anything; ``None`` gives ``""``.
    limit
        Maximum length of the result (at least 1).

    Returns
    -------
    str
        The (possibly shortened) text, whitespace runs collapsed.
    """
    s = "" if text is None else " ".join(str(text).split())
    if len(s) <= limit:
        return s
    return s[: max(0, limit - 1)].rstrip() + "\u2026"


def image_source(post: Mapping[str, Any]) -> Any:
    """The decodable image of a post row: its resolved ``image_path``, else its ``image_bytes``, else ``None``."""
    path = post.get("image_path")
    if path:
        return path
    data = post.get("image_bytes")
    return data if data else None


def metadata_items(post: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
    """The ``(name, value)`` pairs worth showing for a post: known and metadata columns, then ``extra``.

    Parameters
    ----------
    post
        One row of ``Posts.table`` as a dict.
    extra
        Further values to show (for example a computed score), appended in order.

    Returns
    -------
    list of tuple
        Plumbing columns (:data:`INTERNAL_COLUMNS`) and binary values are left out; the image reference is kept
        when it is a name or path.
    """
    items: list[tuple[str, Any]] = []
    ref = post.get("image")
    if isinstance(ref, str) and ref and not ref.startswith("<bytes"):
        items.append(("image", ref))
    for name, value in post.items():
        if name in INTERNAL_COLUMNS or isinstance(value, (bytes, bytearray, memoryview)):
            continue
        items.append((name, value))
    if extra:
        items.extend(extra.items())
    return items


# ------------------------------------------------------------------------------------------ thumbnails
def placeholder_html(size: int, label: str = "no image") -> str:
    """A grey box of ``size`` pixels standing in for an image that cannot be shown."""
    return (
        f'<div class="ccclip-thumb ccclip-thumb-missing" style="width:{size}px;height:{size}px;'
        "display:flex;align-items:center;justify-content:center;background:#eee;color:#777;"
        f'font-size:11px;flex:none">{escape(label)}</div>'
    )


class ThumbnailCache:
    """Thumbnails made one at a time on request and kept in a small least-recently-used cache.

    Parameters
    ----------
    maxsize
        Data URIs kept (each a few kB).
    format
        Thumbnail format passed to :func:`ccclip_widgets.images.thumbnail_data_uri` (WebP is small and every
        current browser shows it).

    Notes
    -----
    Keys are the posts' ``image_key``, so posts sharing an image share a thumbnail. ``made`` counts how many
    thumbnails were actually decoded, which lets tests check that nothing is made up front.
    """

    def __init__(self, maxsize: int = 512, format: str = "WEBP") -> None:
        self.maxsize = int(maxsize)
        self.format = format
        self.made = 0
        self._cache: OrderedDict[tuple[str, int], str | None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def data_uri(self, key: str, source: Any, size: int) -> str | None:
        """Return the thumbnail of ``source`` as a data URI, or ``None`` when it cannot be decoded.

        Parameters
        ----------
        key
            Cache key for the image (its ``image_key``).
        source
            A path or encoded bytes (see :func:`image_source`).
        size
            Longest side in pixels.
        """
        ck = (str(key), int(size))
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        uri: str | None = None
        if source is not None:
            from ..images import thumbnail_data_uri

            try:
                uri = thumbnail_data_uri(source, size=size, format=self.format)
            except Exception as exc:
                log.debug("thumbnail for %s failed: %s", key, exc)
            self.made += 1
        self._cache[ck] = uri
        while len(self._cache) > self.maxsize:
            self._cache.popitem(last=False)
        return uri

    def img_html(self, post: Mapping[str, Any], size: int, *, css_class: str = "ccclip-thumb") -> str:
        """An ``<img>`` tag (or a placeholder box) for one post row, at most ``size`` pixels on its long side.

        Parameters
        ----------
        post
            One row of ``Posts.table`` as a dict (``image_key``, ``image_path``/``image_bytes``, ``post_id``).
        size
            Longest side in pixels.
        css_class
            Class of the tag.
        """
        key = post.get("image_key") or post.get("post_id") or ""
        uri = self.data_uri(str(key), image_source(post), size)
        if uri is None:
            return placeholder_html(size)
        alt = escape(truncate(post.get("text"), 80))
        return (
            f'<img class="{escape(css_class)}" src="{uri}" alt="{alt}" '
            f'style="max-width:{size}px;max-height:{size}px;flex:none;border-radius:3px">'
        )


# ------------------------------------------------------------------------------------------ post card
def post_card_html(
    post: Mapping[str, Any],
    *,
    image_html: str = "",
    extra: Mapping[str, Any] | None = None,
    title: str | None = None,
    headline: tuple[str, ...] = ("lang", "caption_kind", "split"),
) -> str:
    """Render one post as an HTML card: image, ``post_id``, full text, then its metadata.

    Parameters
    ----------
    post
        One row of ``Posts.table`` as a dict.
    image_html
        The image tag to show (from :meth:`ThumbnailCache.img_html`); empty for none.
    extra
        Further ``name: value`` rows for the metadata (scores, counts).
    title
        A heading above the card.
    headline
        Columns whose values are shown on one line under the text (with the ``extra`` values); every metadata
        value is also in a collapsible table below it.

    Returns
    -------
    str
        An HTML fragment whose root has class ``ccclip-card-body`` and a ``data-post-id`` attribute.
    """
    pid = escape(post.get("post_id"))
    items = metadata_items(post, extra)
    rows = "".join(
        f'<tr><th style="text-align:left;padding-right:8px;color:#555;font-weight:normal">{escape(k)}</th>'
        f"<td>{escape(_fmt(v))}</td></tr>"
        for k, v in items
    )
    tags = [escape(post[c]) for c in headline if post.get(c) not in (None, "")]
    tags += [f"{escape(k)}: {escape(_fmt(v))}" for k, v in (extra or {}).items()]
    tag_line = " \u00b7 ".join(tags)
    head = f'<div style="font-weight:bold;margin-bottom:4px">{escape(title)}</div>' if title else ""
    return (
        f'<div class="ccclip-card-body" data-post-id="{pid}">{head}'
        f'<div style="display:flex;gap:10px;align-items:flex-start">{image_html}'
        f'<div style="min-width:0"><div class="ccclip-card-id" style="font-family:monospace">{pid}</div>'
        f'<div class="ccclip-card-text" style="white-space:pre-wrap;word-break:break-word">'
        f"{escape(post.get('text'))}</div>"
        f'<div class="ccclip-card-tags" style="color:#666;font-size:12px;margin-top:4px">'
        f"{tag_line}</div></div></div>"
        f'<details class="ccclip-card-meta"><summary style="font-size:12px;color:#555;cursor:pointer">'
        f"metadata ({len(items)})</summary>"
        f'<table style="font-size:12px;margin-top:4px">{rows}</table></details></div>'
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def register_callback(callbacks: list[Any], callback: Any, remove: bool) -> None:
    """Add ``callback`` to ``callbacks`` once, or remove it (``remove=True``); the ``on_<event>`` contract."""
    if not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if remove:
        if callback in callbacks:
            callbacks.remove(callback)
    elif callback not in callbacks:
        callbacks.append(callback)


class ViewDisplay:
    """What every state-plus-view widget shares: ``.widget`` from its lazily built ``.view``, ``show()`` and
    Jupyter's rich display. The class that mixes it in provides the ``view`` property."""

    view: Any

    @property
    def widget(self) -> Any:
        """The ipywidgets box (built on first access)."""
        return self.view.widget

    def show(self) -> Any:
        """Display the widget (in Jupyter) and return it."""
        from IPython.display import display

        display(self.widget)
        return self.widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
