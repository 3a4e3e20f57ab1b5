"""Shared fixtures: tiny open_clip architectures with random weights, generated posts, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own cache folder so no test sees another's stored vectors."""
    monkeypatch.setenv("CCCLIP_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_arch() -> str:
    """Name of a registered tiny ViT architecture (random init; a few hundred kB of weights)."""
    from ccclip_widgets.models import register_model_config

    return register_model_config("ccclip-test-tiny", TINY_CFG)


@pytest.fixture
def tiny_model(tiny_arch: str):
    """A tiny CLIP with seeded random weights on the CPU."""
    import warnings

    import torch

    from ccclip_widgets.models import load_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)


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


@pytest.fixture
def shape_posts(tmp_path: Path):
    """A Posts table of 24 generated shape images with descriptive texts."""
    import polars as pl

    from ccclip_widgets.posts import read_posts

    recs = make_shape_posts(tmp_path / "imgs")
    path = tmp_path / "posts.csv"
    pl.DataFrame(recs).write_csv(path)
    return read_posts(path, image_root=tmp_path / "imgs")
