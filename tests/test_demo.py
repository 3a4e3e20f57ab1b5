"""The committed demo: posts load cleanly, the demo model loads offline, `ccclip demo` runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.demo import load_demo_posts
from ccclip_widgets.embed import encode_texts
from ccclip_widgets.models import load_model

REPO = Path(__file__).resolve().parent.parent


def test_committed_demo_posts_have_no_rejects_and_both_kinds():
    posts = load_demo_posts()
    assert len(posts.rejects) == 0
    t = posts.table
    assert t["image_key"].n_unique() >= 1500
    assert set(t["caption_kind"].unique()) == {"descriptive", "commentative"}
    com = t.filter(pl.col("caption_kind") == "commentative")
    counts = dict(com.group_by("lang").len().iter_rows())
    assert counts["en"] >= 1500 and all(counts[k] >= 150 for k in ("uk", "es", "de"))
    # the split is by image: no image is in both splits
    per_image = t.group_by("image_key").agg(pl.col("split").n_unique().alias("n"))
    assert per_image["n"].max() == 1


@pytest.mark.slow  # measured 181 s and 21 s (2-core machine, loaded)
def test_demo_model_loads_offline_and_is_deterministic(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = load_model("demo", device="cpu")
    b = load_model("demo", device="cpu")
    assert a.fingerprint == b.fingerprint
    texts = ["a fire truck", "third night shift in a row"]
    va, vb = encode_texts(a, texts), encode_texts(b, texts)
    np.testing.assert_array_equal(va, vb)
    assert va.shape == (2, 256)
    assert a.provenance["training_data"].startswith("910 openclipart images NOT in the demo posts")


@pytest.mark.slow  # measured 181 s and 21 s (2-core machine, loaded)
def test_ccclip_demo_smoke_runs_headless(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CCCLIP_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ccclip_widgets.cli", "demo", "--no-lab", "--smoke", "--no-progress"]
    run = subprocess.run(
        [*cmd, "--out", str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Before fine-tuning" in run.stdout and "After fine-tuning" in run.stdout
    assert "commentative" in run.stdout and "descriptive" in run.stdout
    table = pl.read_csv(tmp_path / "demo" / "gap_table.csv")
    assert set(table["model"]) == {"stand-in CLIP", "C-CLIP (fine-tuned)"}
    # a second run reuses the store and the fine-tuned checkpoint
    again = subprocess.run(
        [*cmd, "--out", str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the fine-tuned model" in again.stdout
    assert "0 images and 0 texts encoded now" in again.stdout
