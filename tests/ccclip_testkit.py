"""Test data shared by the test modules and their subprocess workers: the tiny model config and shape posts.

Kept out of ``conftest.py`` so that test modules can import it by a name no other file in the tree shares (two
``conftest.py`` files, ``tests/`` and ``tests/browser/``, would otherwise compete for ``import conftest``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Seed of the reliability tests' kill points; ``$CCCLIP_RELIABILITY_SEED`` draws others. Read by
#: tests/test_reliability.py and recorded in the session summary of tests/conftest.py.
RELIABILITY_SEED = int(os.environ.get("CCCLIP_RELIABILITY_SEED", "20260"))

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
}
SHAPES = ("square", "circle", "triangle", "stripes")


def draw_shape(color: str, shape: str, size: int = 48, seed: int = 0):
    """A PIL image of a coloured shape with a little noise (a learnable synthetic 'photo')."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = tuple(int(x) for x in rng.integers(200, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c = COLORS[color]
    m = size // 6 + int(rng.integers(0, 3))
    if shape == "square":
        d.rectangle([m, m, size - m, size - m], fill=c)
    elif shape == "circle":
        d.ellipse([m, m, size - m, size - m], fill=c)
    elif shape == "triangle":
        d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=c)
    else:
        for x in range(0, size, 8):
            d.rectangle([x, 0, x + 3, size], fill=c)
    return img


def make_shape_posts(folder: Path, n_per: int = 1, commentative: bool = False, fmt: str = "JPEG"):
    """Write images of every colour x shape and return a list of post records (post_id, image, text, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    k = 0
    for color in COLORS:
        for shape in SHAPES:
            for j in range(n_per):
                name = f"{color}-{shape}-{j}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
                draw_shape(color, shape, seed=k).save(folder / name, fmt)
                text = f"a {color} {shape}"
                records.append(
                    {
                        "post_id": f"p{k:04d}",
                        "image": name,
                        "text": text,
                        "caption_kind": "descriptive",
                        "lang": "en",
                        "split": "train" if j % 4 != 3 else "test",
                    }
                )
                k += 1
    return records


def load_tiny(arch: str, seed: int = 0):
    """A tiny CLIP of the registered ``arch`` with weights seeded by ``seed``, on the CPU."""
    import warnings

    import torch

    from ccclip_widgets.models import load_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(f"{arch}:random", device="cpu", allow_random=True)
