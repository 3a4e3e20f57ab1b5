"""What the demo's models were trained on: never a demo test image, never a reserved image.

The stand-in's training manifest is committed next to its weights (``data/models/demo-clip/standin_manifest.csv``);
the fine-tuning pairs are what ``ccclip demo`` selects from the demo posts.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ccclip_widgets.demo import load_demo_posts
from ccclip_widgets.demo.cli import demo_train_posts
from ccclip_widgets.demo.data.text import _title_key
from ccclip_widgets.demo.standin import demo_validation_ids, read_reserved_images

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "data" / "models" / "demo-clip" / "standin_manifest.csv"


@pytest.fixture(scope="module")
def demo() -> pl.DataFrame:
    return load_demo_posts().table


@pytest.fixture(scope="module")
def manifest() -> pl.DataFrame:
    return pl.read_csv(MANIFEST)


def _test_images(demo: pl.DataFrame) -> pl.DataFrame:
    return demo.filter(pl.col("split") == "test").select("image_id", "source", "title").unique()


def test_manifest_lists_every_standin_image_once(manifest):
    assert manifest.height > 2000
    assert manifest["image_id"].n_unique() == manifest.height
    assert set(manifest["split"]) == {"train", "heldout"}
    assert manifest["source"].str.starts_with("png/").all()


def test_no_demo_test_image_in_any_training_manifest(demo, manifest):
    test = _test_images(demo)
    assert test.height == 403
    trained = manifest.filter(pl.col("split") == "train")
    assert not set(test["image_id"]) & set(trained["image_id"])
    assert not set(test["source"]) & set(trained["source"])
    # nor a drawing with the same normalised title (near-duplicates are grouped by title)
    test_titles = {_title_key(t) for t in test["title"]} - {""}
    assert not test_titles & {_title_key(t) for t in trained["title"]}
    # the fine-tuning pairs come from the train split only
    pairs = demo_train_posts(load_demo_posts().filter(pl.col("split") == "train")).table
    assert not set(pairs["image_id"]) & set(test["image_id"])


def test_no_reserved_image_in_any_training_manifest(demo, manifest):
    reserved = {f"png/{p}.png" for p in read_reserved_images()}
    assert len(reserved) > 600
    assert not reserved & set(manifest["source"])
    assert not reserved & set(demo["source"])


def test_manifest_agrees_with_the_recorded_validation_setting(demo, manifest):
    """The provenance says whether the stand-in's pool left out the demo validation images; the manifest agrees."""
    import json

    meta = json.loads((MANIFEST.parent / "ccclip.json").read_text())
    excluded = meta["provenance"]["validation_excluded"]
    train = demo.filter(pl.col("split") == "train").select("image_id", "split", "title").unique()
    worklist = dict(zip(train["image_id"], train["split"], strict=True))
    val = demo_validation_ids(worklist, dict(zip(train["image_id"], train["title"], strict=True)))
    assert 150 < len(val) < 350
    seen = val & set(manifest.filter(pl.col("split") == "train")["image_id"])
    if excluded:
        assert not seen
    else:  # the shipped weights predate the validation split: say so, and say how many
        assert len(seen) > 0.8 * len(val)
