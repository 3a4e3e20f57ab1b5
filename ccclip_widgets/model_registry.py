"""Named model specs: ``load_model("demo")`` and any other name a plug-in registers.

A named spec maps to a loader ``(device, precision) -> ClipModel``. The loader is given either as a callable or
as a ``"module:function"`` string that is imported only when the name is loaded, so :mod:`ccclip_widgets.models`
never imports what it names (the demo model lives in :mod:`ccclip_widgets.demo`, which imports the training
code, which imports :mod:`ccclip_widgets.models`: naming it by string keeps the core free of that circle).

Examples
--------
>>> from ccclip_widgets.model_registry import register_model_spec
>>> register_model_spec("my-clip", "my_package.models:load_my_clip")  # doctest: +SKIP
>>> load_model("my-clip")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["model_spec_loader", "named_model_specs", "register_model_spec"]

Loader = Callable[[Any, str], Any]

_lock = threading.Lock()
_loaders: dict[str, Loader | str] = {
    # The offline demo registers here by name; its module is imported on first use only.
    "demo": "ccclip_widgets.demo.model:load_demo_model",
}


def register_model_spec(name: str, loader: Loader | str, *, replace: bool = False) -> None:
    """Make ``load_model(name)`` call ``loader(device, precision)``.

    Parameters
    ----------
    name
        The spec as users write it; it must contain no ``:`` or path separator (those forms are taken).
    loader
        A callable, or ``"package.module:function"`` imported when the name is first loaded.
    replace
        Allow replacing an existing name.
    """
    if not name or any(c in name for c in ":/\\"):
        raise ValueError(f"a named model spec must be a plain word, got {name!r}")
    if isinstance(loader, str) and ":" not in loader:
        raise ValueError(f"loader must be a callable or 'module:function', got {loader!r}")
    with _lock:
        if name in _loaders and not replace:
            raise ValueError(f"model spec {name!r} is already registered (pass replace=True)")
        _loaders[name] = loader


def named_model_specs() -> list[str]:
    """The registered names, sorted."""
    with _lock:
        return sorted(_loaders)


def model_spec_loader(name: str) -> Loader | None:
    """The loader registered for ``name`` (imported now if it was named by string), or ``None``."""
    with _lock:
        loader = _loaders.get(name)
    if loader is None or callable(loader):
        return loader
    module, _, attr = loader.partition(":")
    resolved = getattr(importlib.import_module(module), attr)
    with _lock:
        _loaders[name] = resolved
    return resolved
