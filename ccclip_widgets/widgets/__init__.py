"""Jupyter widgets over the toolkit: the :class:`Explorer` map, the ``Gap`` view and the ``FineTune`` panel.

This is the only part of the package that imports ``ipywidgets`` or ``plotly``. Names are resolved lazily, so
``import ccclip_widgets.widgets`` is cheap and works without the optional dependencies; building a widget
without them raises an ``ImportError`` that names the install command::

    pip install "ccclip_widgets[widgets]"
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Explorer": "explorer",
    "Gap": "gap",
    "FineTune": "finetune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
