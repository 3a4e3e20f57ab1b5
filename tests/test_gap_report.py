"""Verdicts per language and the gallery, on constructed ranks with known answers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.gap_report import format_verdicts, gap_gallery, gap_verdicts, text_to_image_ranks


def _posts(n: int = 200) -> pl.DataFrame:
    rows = []
    for i in range(n):
        rows.append(
            {
                "post_id": f"d{i}",
                "caption_kind": "descriptive",
                "lang": "en",
                "text": f"d {i}",
                "image": f"{i}.png",
            }
        )
        for lang in ("en", "uk"):
            rows.append(
                {
                    "post_id": f"c{lang}{i}",
                    "caption_kind": "commentative",
                    "lang": lang,
                    "text": f"{lang} {i}",
                    "image": f"{i}.png",
                }
            )
    return pl.DataFrame(rows)


def test_verdicts_find_a_real_rise_and_no_change():
    posts = _posts()
    rng = np.random.default_rng(0)
    kind, lang = posts["caption_kind"].to_numpy(), posts["lang"].to_numpy()
    before = np.where(
        kind == "descriptive", rng.integers(1, 15, len(posts)), rng.integers(1, 200, len(posts))
    )
    after = before.copy()
    en = (kind == "commentative") & (lang == "en")
    after[en] = rng.integers(1, 20, en.sum())  # English commentative captions now mostly found
    v = gap_verdicts(before.astype(float), after.astype(float), posts, k=10, n_boot=500, seed=1)
    assert set(v["lang"]) == {"en", "uk"}
    row_en = v.filter(pl.col("lang") == "en").row(0, named=True)
    row_uk = v.filter(pl.col("lang") == "uk").row(0, named=True)
    assert row_en["change_lo"] > 0 and row_en["comm_after"] > row_en["comm_before"]
    assert row_en["gap_after"] < row_en["gap_before"] and row_en["gap_closed"] > 0.3
    assert "outside the noise" in row_en["verdict"]
    assert row_uk["change"] == 0 and row_uk["change_lo"] <= 0 <= row_uk["change_hi"]
    assert "no change beyond the noise" in row_uk["verdict"]
    # descriptive recall is the same reference for both languages
    assert (
        row_en["desc_before"]
        == row_uk["desc_before"]
        == pytest.approx((before[kind == "descriptive"] <= 10).mean())
    )
    assert format_verdicts(v).count("\n") == 1


def test_verdicts_need_the_reference_group():
    posts = _posts(20).filter(pl.col("caption_kind") == "commentative")
    r = np.ones(posts.height)
    with pytest.raises(ValueError, match="descriptive"):
        gap_verdicts(r, r, posts)


def test_gallery_picks_captions_missed_before_and_found_after():
    posts = _posts(30)
    before = np.full(posts.height, 3.0)
    after = before.copy()
    moved = [5, 8, 11]  # rows of commentative posts
    assert all(posts["caption_kind"][i] == "commentative" for i in moved)
    before[moved] = [40.0, 90.0, 60.0]
    after[moved] = [2.0, 1.0, 7.0]  # the last is found, but not within 5
    g = gap_gallery(before, after, posts, per_lang=5, found_within=5, missed_beyond=20)
    assert g["post_id"].to_list() == [posts["post_id"][8], posts["post_id"][5]]
    assert g["rank_before"].to_list() == [90.0, 40.0]


def test_text_to_image_ranks_shared_pool():
    posts = pl.DataFrame({"image_key": ["a", "a", "b", "c"], "caption_kind": ["x"] * 4, "lang": ["en"] * 4})
    img = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    txt = np.array([[1.0, 0.1, 0], [0, 1.0, 0], [0, 1.0, 0], [0.9, 0, 0.1]])
    ranks = text_to_image_ranks(img, txt, posts)
    # post 1 ties its own image with c below b: mid-rank 2.5
    assert ranks.tolist() == [1.0, 2.5, 1.0, 2.0]
