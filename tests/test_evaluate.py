"""Retrieval metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.evaluate import (
    commentativeness,
    commentativeness_auc,
    evaluate_retrieval,
    format_gap_table,
    retrieval_ranks,
)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def test_identity_gives_rank_one():
    x = random_unit(50)
    ranks = retrieval_ranks(x, x, np.arange(50))
    assert ranks.dtype == np.float64
    np.testing.assert_array_equal(ranks, np.ones(50))


def test_crafted_rank_three():
    # Query along e0; candidates at cosines 0.9, 0.8, 0.7 (positive), 0.1.
    cos = np.array([0.9, 0.8, 0.7, 0.1])
    cand = np.stack([cos, np.sqrt(1 - cos**2), np.zeros(4)], axis=1)
    q = np.array([[1.0, 0.0, 0.0]])
    assert retrieval_ranks(q, cand, [2])[0] == 3.0
    assert retrieval_ranks(q, cand, [0])[0] == 1.0
    assert retrieval_ranks(q, cand, [3])[0] == 4.0
    # Two positives (a group): the best-ranked one counts.
    assert retrieval_ranks(q, cand, [7], candidate_groups=[1, 7, 2, 7])[0] == 2.0


def test_ties_use_mid_rank():
    q = np.array([[1.0, 0.0]])
    # One candidate above, the positive tied with two negatives: optimistic 2, pessimistic 4 -> 3.
    cand = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert retrieval_ranks(q, cand, [2])[0] == 3.0
    # Tied with one negative: 1.5 -> not a hit at k=1.
    assert retrieval_ranks(q, cand[1:3], [0])[0] == 1.5
    # Two tied positives and one tied negative: optimistic 2, pessimistic 3 -> 2.5.
    assert retrieval_ranks(q, cand, [5], candidate_groups=[0, 5, 5, 1, 2])[0] == 2.5
    # All positives tied, no tied negative: no penalty.
    assert retrieval_ranks(q, cand, [5], candidate_groups=[0, 5, 5, 5, 2])[0] == 2.0


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    q, c = random_unit(300, seed=2), random_unit(200, seed=3)
    pos = rng.integers(0, 200, 300)
    full = retrieval_ranks(q, c, pos, chunk_size=10_000)
    for chunk in (1, 7, 64):
        np.testing.assert_array_equal(retrieval_ranks(q, c, pos, chunk_size=chunk), full)
    # The same against numpy brute force.
    s = q @ c.T
    expected = 1 + (s > s[np.arange(300), pos][:, None]).sum(1)
    np.testing.assert_array_equal(full, expected)
    groups = rng.integers(0, 40, 200)
    qg = groups[rng.integers(0, 200, 300)]
    g_full = retrieval_ranks(q, c, qg, candidate_groups=groups, chunk_size=10_000)
    np.testing.assert_array_equal(retrieval_ranks(q, c, qg, candidate_groups=groups, chunk_size=3), g_full)


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    x = random_unit(20)
    ranks = retrieval_ranks(torch.from_numpy(x), torch.from_numpy(x), torch.arange(20))
    np.testing.assert_array_equal(ranks, np.ones(20))


def test_missing_positive_rejected():
    x = random_unit(5)
    with pytest.raises(ValueError, match="no positive"):
        retrieval_ranks(x, x, [0, 1, 2, 3, 9], candidate_groups=[0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="candidate indices"):
        retrieval_ranks(x, x, [0, 1, 2, 3, 9])


def make_posts(n: int, seed: int = 0, noise: float = 0.8) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1000)
    img = random_unit(n, seed=seed)
    txt = unit(img + noise * rng.standard_normal(img.shape))
    posts = pl.DataFrame(
        {
            "post_id": [f"p{i}" for i in range(n)],
            "image_key": [f"k{i}" for i in range(n)],
            "caption_kind": np.where(np.arange(n) % 2 == 0, "descriptive", "commentative"),
            "lang": np.where(np.arange(n) % 3 == 0, "uk", "en"),
        }
    )
    return posts, img, txt


def test_evaluate_identity_and_columns():
    posts, img, _ = make_posts(60)
    df = evaluate_retrieval({"perfect": (img, img)}, posts, n_boot=200, pool="group")
    assert df.columns[:4] == ["model", "direction", "caption_kind", "lang"]
    for c in (
        "n_queries",
        "pool_size",
        "r_at_1",
        "r_at_1_lo",
        "r_at_1_hi",
        "r_at_10_hi",
        "median_rank",
        "mean_rank",
        "chance_r_at_10",
    ):
        assert c in df.columns
    assert df.height == 2 * 4  # 2 directions x 2 kinds x 2 languages
    assert (df["r_at_1"] == 1.0).all() and (df["median_rank"] == 1.0).all()
    assert (df["r_at_1_lo"] == 1.0).all()
    # pool="group": each group's pool is its own posts.
    sizes = posts.group_by("caption_kind", "lang").len()
    merged = df.join(sizes, on=["caption_kind", "lang"])
    assert (merged["pool_size"] == merged["len"]).all() and (merged["n_queries"] == merged["len"]).all()
    np.testing.assert_allclose(df["chance_r_at_10"], np.minimum(1, 10 / df["pool_size"].to_numpy()))
    all_pool = evaluate_retrieval({"perfect": (img, img)}, posts, n_boot=0)  # pool="all" is the default
    assert (all_pool["pool_size"] == 60).all()


def test_evaluate_matches_direct_ranks_and_pool_all():
    posts, img, txt = make_posts(120, seed=4)
    df = evaluate_retrieval({"m": (img, txt)}, posts, pool="all", n_boot=0, ks=(1, 5, 10))
    ranks = retrieval_ranks(txt, img, np.arange(120))
    for row in df.filter(pl.col("direction") == "text_to_image").iter_rows(named=True):
        mask = ((posts["caption_kind"] == row["caption_kind"]) & (posts["lang"] == row["lang"])).to_numpy()
        assert row["n_queries"] == mask.sum()
        assert row["r_at_5"] == pytest.approx(np.mean(ranks[mask] <= 5))
        assert row["median_rank"] == pytest.approx(np.median(ranks[mask]))
        assert np.isnan(row["r_at_5_lo"])


def test_shared_image_three_languages_no_false_negatives():
    rng = np.random.default_rng(5)
    base = random_unit(20, seed=6)
    # Post 0, 1, 2: the same image with captions in three languages; the captions sit close to the image but
    # in different directions so that each caption's own text rivals the others.
    img = np.concatenate([base[[0, 0, 0]], base[1:]])
    txt = unit(img + 0.05 * rng.standard_normal(img.shape))
    posts = pl.DataFrame(
        {
            "post_id": [f"p{i}" for i in range(len(img))],
            "image_key": ["A", "A", "A", *[f"k{i}" for i in range(1, 20)]],
            "caption_kind": ["commentative"] * len(img),
            "lang": ["en", "de", "uk", *["en"] * 19],
        }
    )
    df = evaluate_retrieval({"m": (img, txt)}, posts, pool="all", n_boot=0)
    # Text -> image: the pool holds 20 unique images, each caption's positive is image A: all rank 1.
    t2i = df.filter(pl.col("direction") == "text_to_image")
    assert (t2i["pool_size"] == 20).all() and (t2i["r_at_1"] == 1.0).all()
    # Image -> text: image A has three positives; it is a query once per language group, never penalized by its
    # other captions.
    i2t = df.filter(pl.col("direction") == "image_to_text")
    assert (i2t["pool_size"] == 22).all() and (i2t["r_at_1"] == 1.0).all()
    assert i2t.filter(pl.col("lang") == "en")["n_queries"].item() == 20  # A once + 19 others
    # Without shared-image handling (every post its own key), the duplicates compete and R@1 drops.
    naive = evaluate_retrieval({"m": (img, txt)}, posts.drop("image_key"), pool="all", n_boot=0)
    assert naive.filter(pl.col("direction") == "text_to_image")["r_at_1"].min() < 1.0


def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n in (100, 1600):
        posts, img, txt = make_posts(n, seed=7, noise=0.4)
        posts = posts.with_columns(pl.lit("c").alias("caption_kind"), pl.lit("en").alias("lang"))
        df = evaluate_retrieval({"m": (img, txt)}, posts, pool="group", n_boot=500, seed=1)
        row = df.filter(pl.col("direction") == "text_to_image").row(0, named=True)
        for k in (1, 5, 10):
            assert row[f"r_at_{k}_lo"] <= row[f"r_at_{k}"] <= row[f"r_at_{k}_hi"]
        assert 0.0 < row["r_at_1"] < 1.0
        widths.append(row["r_at_1_hi"] - row["r_at_1_lo"])
    assert widths[1] < 0.5 * widths[0]
    # Deterministic for a seed.
    posts, img, txt = make_posts(100, seed=7)
    a = evaluate_retrieval({"m": (img, txt)}, posts, n_boot=300, seed=3)
    b = evaluate_retrieval({"m": (img, txt)}, posts, n_boot=300, seed=3)
    assert a.equals(b)


def test_bootstrap_matches_resampling_rank_arrays():
    # The multinomial shortcut has the same distribution as resampling the rank array itself.
    from ccclip_widgets.evaluate import _bootstrap_recall

    rng = np.random.default_rng(0)
    ranks = rng.integers(1, 30, 400).astype(float)
    res = _bootstrap_recall(ranks, (1, 5, 10), 4000, 0.95, np.random.default_rng(1))
    idx = rng.integers(0, 400, (4000, 400))
    direct = (ranks[idx] <= 10).mean(1)
    lo, hi = np.quantile(direct, [0.025, 0.975])
    assert res[10][1] == pytest.approx(lo, abs=0.01) and res[10][2] == pytest.approx(hi, abs=0.01)


def test_several_models_and_gap_table():
    posts, img, txt = make_posts(80, seed=8)
    df = evaluate_retrieval({"base": (img, txt), "tuned": (img, img)}, posts, n_boot=100)
    assert set(df["model"]) == {"base", "tuned"} and df.height == 16
    table = format_gap_table(df)
    lines = table.splitlines()
    assert "t2i R@1" in lines[0] and "i2t R@10" in lines[0] and "caption_kind" in lines[0]
    assert len(lines) == 2 + 8
    assert any(line.startswith("tuned") and "1.00 [1.00,1.00]" in line for line in lines)


def test_rows_must_align():
    posts, img, txt = make_posts(10)
    with pytest.raises(ValueError, match="align"):
        evaluate_retrieval({"m": (img[:9], txt[:9])}, posts)


def test_commentativeness_and_auc():
    rng = np.random.default_rng(9)
    n = 200
    img = random_unit(n, seed=10)
    kind = np.where(np.arange(n) < 100, "descriptive", "commentative")
    # Descriptive captions point at their image; commentative ones point nowhere in particular.
    txt = np.where(
        (kind == "descriptive")[:, None],
        img + 0.3 * rng.standard_normal(img.shape),
        rng.standard_normal(img.shape),
    )
    scores = commentativeness(img, unit(txt), [f"k{i}" for i in range(n)])
    assert scores.shape == (n,) and scores.min() >= 0 and scores.max() <= 1
    assert np.median(scores[kind == "descriptive"]) == 0.0
    auc = commentativeness_auc(scores, kind)
    assert auc > 0.9
    assert commentativeness_auc(-scores, kind) == pytest.approx(1 - auc)
    # Own image ranked last -> score 1; first -> 0.
    q = np.eye(3, dtype=np.float32)
    assert commentativeness(q, q, ["a", "b", "c"]).tolist() == [0.0, 0.0, 0.0]
    assert commentativeness(q, -q, ["a", "b", "c"]).tolist() == [1.0, 1.0, 1.0]


def test_auc_against_pairwise_definition():
    rng = np.random.default_rng(11)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    lab = rng.random(60) < 0.4
    pos, neg = s[lab], s[~lab]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert commentativeness_auc(s, lab) == pytest.approx(expected)
    assert np.isnan(commentativeness_auc(s, np.ones(60, bool)))
