"""A progress line shown in the notebook while a widget's slow first steps run (embedding, index, map).

:class:`WidgetProgress` is a reporter with the ``phase(text)`` / ``done()`` interface of
:class:`~ccclip_widgets.widgets._explorer_build.LogProgress`. It displays, in the output of the cell that builds
the widget, one line naming the current step and its elapsed time, with the backend's own ``tqdm.auto`` bars
(embedding batches, UMAP epochs) captured just below it in an ``Output`` area, so they land beside the line rather
than in a log. When the work is done the bars go and one quiet summary line stays.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from ._common import escape, require_widgets

log = logging.getLogger(__name__)

__all__ = ["WidgetProgress", "in_notebook"]


def in_notebook() -> bool:
    """Whether code runs in a Jupyter kernel with ipywidgets available (so a widget can be shown)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or "IPKernelApp" not in getattr(shell, "config", {}):
            return False
        require_widgets()
    except (ImportError, AttributeError):
        return False
    return True


class WidgetProgress:
    """One visible progress line (class ``ccclip-progress``) plus the backend's bars, shown at construction."""

    def __init__(self, title: str = "Explorer") -> None:
        w = require_widgets()
        self.title = title
        self.steps: list[tuple[str, float]] = []
        self._t0 = time.perf_counter()
        self.line = w.HTML(self._html("starting\u2026"))
        self.bars = w.Output()
        self.root = w.VBox([self.line, self.bars])
        self.root.add_class("ccclip-progress")
        from IPython.display import display

        display(self.root)

    def _html(self, text: str, busy: bool = True) -> str:
        icon = "\u23f3" if busy else "\u2714"
        return (
            f'<div class="ccclip-progress-line" style="font-size:13px;color:#333">{icon} '
            f"<b>{escape(self.title)}</b>: {escape(text)}</div>"
        )

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        """Show ``text`` as the current step while the block runs; the block's tqdm bars show under it."""
        n = len(self.steps) + 1
        t0 = time.perf_counter()
        self.line.value = self._html(f"step {n}: {text}\u2026")
        with self.bars:
            yield
        self.steps.append((text, time.perf_counter() - t0))

    def done(self, text: str = "") -> None:
        """Replace the bars by one summary line."""
        self.bars.clear_output()
        total = time.perf_counter() - self._t0
        slow = [f"{t} {d:.0f} s" for t, d in self.steps if d >= 1.0]
        summary = text or f"ready in {total:.0f} s" + (f" ({'; '.join(slow)})" if slow else "")
        self.line.value = self._html(summary, busy=False)

    def close(self) -> None:
        self.root.close()


def default_progress(show_progress: bool, title: str = "Explorer") -> Any:
    """A :class:`WidgetProgress` in a notebook when progress is wanted, else ``None`` (the log reporter)."""
    if show_progress and in_notebook():
        try:
            return WidgetProgress(title)
        except Exception:  # a progress line must never stop the widget
            log.debug("progress line unavailable", exc_info=True)
    return None
