"""The card's list of the other posts that share the open post's image: "Same image, N other posts".

Part of the Explorer's view (it imports ipywidgets): a heading, one row per listed post (a button that opens it,
labelled with its language and caption kind, and its text shortened) and a "+k more" note when the state's
:attr:`~._explorer_lists.ListsAndRows.same_image_limit` cuts the list. What is listed, and in which order, is the
state's (:meth:`~._explorer_lists.ListsAndRows.same_image_posts`); this module only renders it. Every text put
into HTML is escaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._common import escape, require_widgets, truncate

if TYPE_CHECKING:  # pragma: no cover
    from .explorer import Explorer

__all__ = ["SameImagePanel", "entry_label", "entry_html", "heading_html", "more_html"]

_TEXT_LIMIT = 90


def entry_label(rec: dict[str, Any]) -> str:
    """A row's button text: ``"uk · commentative"`` (the columns the posts have), else the ``post_id``."""
    tags = [str(rec[c]) for c in ("lang", "caption_kind") if rec.get(c) not in (None, "")]
    return " \u00b7 ".join(tags) if tags else str(rec["post_id"])


def entry_html(rec: dict[str, Any]) -> str:
    """A row's text: the post's text shortened, escaped, naming its post in ``data-post-id``."""
    pid = escape(rec["post_id"])
    return (
        f'<div class="ccclip-same-image-text" data-post-id="{pid}" title="{pid}" '
        f'style="font-size:12px;line-height:1.3;color:#333">{escape(truncate(rec.get("text"), _TEXT_LIMIT))}</div>'
    )


def heading_html(total: int) -> str:
    """The list's heading, counting every other post of the image (listed or not)."""
    noun = "post" if total == 1 else "posts"
    return (
        f'<div class="ccclip-same-image-heading" data-count="{int(total)}" style="font-size:12px;color:#555;'
        f'margin-top:6px"><b>Same image</b>, {int(total):,} other {noun}</div>'
    )


def more_html(more: int) -> str:
    """The note under a cut list (empty when nothing was left out)."""
    if more <= 0:
        return ""
    return (
        f'<div class="ccclip-same-image-more" data-more="{int(more)}" style="font-size:12px;color:#777">'
        f"+{int(more):,} more (<code>.same_image_posts()</code> lists them all)</div>"
    )


class SameImagePanel:
    """The widget under the card: rebuilt from the state by :meth:`render`; its buttons open their post."""

    def __init__(self, ex: Explorer) -> None:
        w = require_widgets()
        self.ex = ex
        self.heading = w.HTML()
        self.more = w.HTML()
        self.rows: list[Any] = []  # a pool of row widgets, reused from click to click
        self.box = w.VBox([self.heading, self.more], layout=w.Layout(display="none"))
        self.box.add_class("ccclip-same-image")

    def _new_row(self) -> Any:
        w = require_widgets()
        btn = w.Button(layout=w.Layout(width="auto", flex="0 0 auto"))
        btn.add_class("ccclip-same-image-button")
        btn.target_row = None
        btn.on_click(
            lambda b: self.ex._guard(self.ex.click, b.target_row) if b.target_row is not None else None
        )
        text = w.HTML(layout=w.Layout(flex="1 1 0", min_width="0"))
        row = w.HBox([btn, text], layout=w.Layout(align_items="center"))
        row.add_class("ccclip-same-image-row")
        return row

    def render(self) -> None:
        """Show the other posts of the open post's image (hide the panel when there are none)."""
        ex = self.ex
        total = ex.same_image_count()
        if total == 0:
            self.box.layout.display = "none"
            self.box.children = [self.heading, self.more]
            return
        recs = ex.same_image_posts(limit=ex.same_image_limit).to_dicts()
        while len(self.rows) < len(recs):
            self.rows.append(self._new_row())
        for row, rec in zip(self.rows, recs):
            btn, text = row.children
            btn.description = entry_label(rec)
            btn.tooltip = f"open {rec['post_id']}"
            btn.target_row = int(rec["index"])
            text.value = entry_html(rec)
        self.heading.value = heading_html(total)
        self.more.value = more_html(total - len(recs))
        self.box.children = [self.heading, *self.rows[: len(recs)], self.more]
        self.box.layout.display = None
