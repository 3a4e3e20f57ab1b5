"""Offline demo: the openclipart data set (built by the package ``tools/demo_data``) and the demo model.

Kept import-light: nothing heavy is imported until a builder or loader is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tutorial import tutorial_data

__all__ = ["build_demo_data", "demo_posts_path", "load_demo_posts", "tutorial_data"]


def demo_posts_path() -> Path:
    """Path of the committed demo posts table (``data/demo/posts.parquet``)."""
    from .._io import repo_data_dir

    return repo_data_dir() / "demo" / "posts.parquet"


def load_demo_posts(**kwargs: Any) -> Any:
    """Read the committed demo posts (openclipart images, descriptive + commentative captions).

    Parameters
    ----------
    **kwargs
        Passed to :func:`ccclip_widgets.read_posts`.

    Returns
    -------
    Posts
    """
    from ..posts import read_posts

    path = demo_posts_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"Demo posts not found at {path}. They ship with the repository (data/demo); rebuild them with "
            "`python -m ccclip_widgets.demo build-data`."
        )
    return read_posts(path, **kwargs)


def __getattr__(name: str) -> Any:  # lazy re-export, so `import ccclip_widgets.demo` stays cheap
    if name == "build_demo_data":
        from .data import build_demo_data

        return build_demo_data
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
