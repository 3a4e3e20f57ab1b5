"""Shared fixtures: tiny open_clip architectures with random weights, generated posts, offline settings.

Also what two test modules share: the local HTTP server of the download tests (test_fetch.py,
test_fetch_posts.py) and the inputs and session summary of the reliability tests (test_reliability.py,
test_reliability_storage.py).
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled numba kernels (umap-learn, pynndescent) are cached between runs and shared by xdist workers; numba's
# cache is safe for concurrent writers. Without a kept cache each run compiles them again (tens of seconds).
os.environ.setdefault(
    "NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "numba")
)

from ccclip_testkit import (  # noqa: F401
    COLORS,
    RELIABILITY_SEED,
    SHAPES,
    TINY_CFG,
    draw_shape,
    load_tiny,
    make_shape_posts,
)
from fetch_server import PROXY_VARS, Server, _Handler, _QuietServer, _State


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
    return load_tiny(tiny_arch, 0)


@pytest.fixture
def shape_posts(tmp_path: Path):
    """A Posts table of 24 generated shape images with descriptive texts."""
    import polars as pl

    from ccclip_widgets.posts import read_posts

    recs = make_shape_posts(tmp_path / "imgs")
    path = tmp_path / "posts.csv"
    pl.DataFrame(recs).write_csv(path)
    return read_posts(path, image_root=tmp_path / "imgs")


# The local HTTP server (tests/fetch_server.py) of test_fetch.py and test_fetch_posts.py
@pytest.fixture(scope="module")
def _server() -> Server:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The module's server with fresh counters; proxy and offline variables cleared for the test."""
    _server.state.reset()
    for name in (*PROXY_VARS, "CCCLIP_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return _server


# The reliability tests (test_reliability.py, test_reliability_storage.py): their inputs and their summary
@pytest.fixture(scope="session")
def summary(tmp_path_factory: pytest.TempPathFactory):
    """Counts of the cases run, written as JSON at the end of the session."""
    data: dict[str, Any] = defaultdict(lambda: defaultdict(int))
    yield data
    out = os.environ.get("CCCLIP_RELIABILITY_SUMMARY") or str(
        tmp_path_factory.getbasetemp() / "reliability_summary.json"
    )
    totals: dict[str, int] = defaultdict(int)
    for group in data.values():
        for key, value in group.items():
            if isinstance(value, int):
                totals[key] += value
    Path(out).write_text(
        json.dumps({"seed": RELIABILITY_SEED, "groups": data, "totals": totals}, indent=1, default=list)
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_arch: str) -> Path:
    """Posts, images, a saved tiny model and random vectors shared by the worker processes."""
    import numpy as np
    import polars as pl
    import torch

    from ccclip_widgets.models import load_model, save_checkpoint

    root = tmp_path_factory.mktemp("reliability-inputs")
    recs = make_shape_posts(root / "imgs", n_per=2)  # 48 posts, 48 images, 24 distinct texts
    pl.DataFrame(recs).write_csv(root / "posts.csv")
    pl.DataFrame(recs[:24]).write_csv(root / "posts-train.csv")
    pl.DataFrame(recs[:32]).write_csv(root / "posts-first.csv")  # overlapping halves for the concurrency test
    pl.DataFrame(recs[16:]).write_csv(root / "posts-second.csv")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)
    save_checkpoint(model, root / "model")
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(6, 16))
    img = centers[rng.integers(0, 6, 120)] + 0.3 * rng.normal(size=(120, 16))
    txt = img + 0.2 * rng.normal(size=img.shape)
    norm = np.linalg.norm
    np.savez(
        root / "vectors.npz",
        image=(img / norm(img, axis=1, keepdims=True)).astype(np.float32),
        text=(txt / norm(txt, axis=1, keepdims=True)).astype(np.float32),
    )
    return root
