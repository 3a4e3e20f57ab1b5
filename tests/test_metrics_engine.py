"""One retrieval-metrics engine: training-time metrics, evaluate_retrieval and the widgets give the same numbers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.evaluate import evaluate_retrieval, group_ranks, retrieval_ranks
from ccclip_widgets.train import retrieval_metrics
from ccclip_widgets.train.metrics import post_groups


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _posts(n_images=30, seed=0):
    """Every image has a descriptive en caption; two thirds also a commentative one in en or de."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.standard_normal((n_images, 16)))
    rows, img, txt = [], [], []
    for i in range(n_images):
        kinds = [("descriptive", "en")] + ([("commentative", "en" if i % 2 else "de")] if i % 3 else [])
        for kind, lang in kinds:
            noise = 0.3 if kind == "descriptive" else 1.2
            rows.append(
                {"post_id": f"p{len(rows)}", "image_key": f"k{i}", "caption_kind": kind, "lang": lang}
            )
            img.append(base[i])
            txt.append(base[i] + noise * rng.standard_normal(16))
    return pl.DataFrame(rows), _unit(np.array(img)), _unit(np.array(txt))


def _flat_from_frame(df: pl.DataFrame, group: str) -> dict[str, float]:
    out = {}
    for r in df.iter_rows(named=True):
        for m in ("r_at_1", "r_at_5", "r_at_10", "median_rank", "mean_rank", "n_queries", "pool_size"):
            out[f"{r['direction']}/{group}/{m}"] = float(r[m])
    return out


def _evaluate_like_training(table, img, txt):
    """evaluate_retrieval for every training-time group (all, kind, lang, kind x lang), as flat keys."""
    out = {}
    for group_by in ((), ("caption_kind",), ("lang",), ("caption_kind", "lang")):
        df = evaluate_retrieval({"m": (img, txt)}, table, group_by=group_by, n_boot=0)
        for r in df.iter_rows(named=True):
            parts = [r["caption_kind"]] if "caption_kind" in group_by else []
            parts += [f"lang={r['lang']}"] if "lang" in group_by else []
            name = ",".join(parts) or "all"
            out.update(_flat_from_frame(pl.DataFrame([r]), name))
    return out


def test_constant_model_gets_the_same_mid_rank_everywhere():
    # 20 images, one caption each, every score tied: the documented rule puts each query at rank 10.5
    table = pl.DataFrame({"post_id": [f"p{i}" for i in range(20)], "image_key": [f"k{i}" for i in range(20)]})
    const = np.ones((20, 4), dtype=np.float32) / 2
    flat = retrieval_metrics(const, const, np.arange(20), np.arange(20))
    frame = evaluate_retrieval({"m": (const, const)}, table, group_by=(), n_boot=0)
    for direction in ("text_to_image", "image_to_text"):
        row = frame.filter(pl.col("direction") == direction).row(0, named=True)
        assert flat[f"{direction}/all/median_rank"] == row["median_rank"] == 10.5
        assert flat[f"{direction}/all/r_at_10"] == row["r_at_10"] == 0.0


def test_training_metrics_equal_evaluate_retrieval_on_the_same_vectors():
    table, img, txt = _posts()
    keys = table["image_key"].to_list()
    image_index = np.unique(keys, return_inverse=True)[1]
    uimg = img[np.unique(image_index, return_index=True)[1]]
    flat = retrieval_metrics(uimg, txt, image_index, np.arange(table.height), post_groups(table))
    expected = _evaluate_like_training(table, img, txt)
    assert set(flat) == set(expected)
    for key, value in expected.items():
        assert flat[key] == pytest.approx(value), key
    # every group is ranked against the same candidates: all 30 images, all texts
    assert flat["text_to_image/commentative,lang=de/pool_size"] == 30
    assert flat["image_to_text/commentative/pool_size"] == table.height


def test_image_queries_are_not_answered_by_captions_outside_their_group():
    # one image with a perfect descriptive caption and a useless commentative one, among 9 other images
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((10, 8)))
    txt = np.concatenate([base[:1], _unit(-base[:1]), base[1:]])  # row 1: the commentative caption, far away
    img = np.concatenate([base[:1], base[:1], base[1:]])
    table = pl.DataFrame(
        {
            "post_id": [f"p{i}" for i in range(11)],
            "image_key": ["A", "A", *[f"k{i}" for i in range(1, 10)]],
            "caption_kind": ["descriptive", "commentative", *["descriptive"] * 9],
        }
    )
    df = evaluate_retrieval({"m": (img, txt)}, table, group_by=("caption_kind",), n_boot=0)
    row = df.filter((pl.col("direction") == "image_to_text") & (pl.col("caption_kind") == "commentative"))
    # its only positive is the commentative caption, which every other text outranks (the descriptive one of the
    # same image is left out: 9 texts above it, not 10)
    assert row["median_rank"].item() == 10.0 and row["pool_size"].item() == 11
    ranks = retrieval_ranks(
        img[[1]], txt, [0], candidate_groups=[0, 0, *range(1, 10)], candidate_mask=[False, True, *[True] * 9]
    )
    assert ranks.tolist() == [10.0]


def test_group_ranks_pool_group_matches_evaluate_retrieval():
    table, img, txt = _posts(seed=3)
    df = evaluate_retrieval({"m": (img, txt)}, table, group_by=("caption_kind",), n_boot=0, pool="group")
    rows = {k: (table["caption_kind"] == k).to_numpy() for k in ("commentative", "descriptive")}
    ranked = group_ranks(img, txt, table["image_key"].to_numpy(), rows, pool="group")
    for (direction, kind), result in ranked.items():
        row = df.filter((pl.col("direction") == direction) & (pl.col("caption_kind") == kind)).row(
            0, named=True
        )
        assert row["median_rank"] == np.median(result.ranks) and row["pool_size"] == result.pool_size


def test_fine_tune_evaluation_equals_evaluate_retrieval_and_hands_back_its_vectors(tiny_model, tmp_path):
    from ccclip_testkit import make_shape_posts

    from ccclip_widgets.posts import read_posts
    from ccclip_widgets.train import FineTuneConfig, fine_tune

    recs = make_shape_posts(tmp_path / "imgs")
    recs += [
        dict(
            r, post_id=f"c{i}", text=f"so me #{i}", caption_kind="commentative", lang="de" if i % 2 else "en"
        )
        for i, r in enumerate(recs[:10])
    ]
    posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs")
    evals = []
    cfg = FineTuneConfig(
        max_steps=1,
        batch_size=6,
        num_workers=0,
        show_progress=False,
        eval_at_start=True,
        checkpoint_every_steps=0,
    )
    fine_tune(tiny_model, posts, cfg, eval_posts=posts, on_eval=evals.append)
    info = evals[0]
    vec = info.vectors
    assert vec is not None and vec.image.shape[0] == vec.text.shape[0] == posts.table.height
    assert vec.table["post_id"].to_list() == posts.table["post_id"].to_list() and vec.image_ok.all()
    expected = _evaluate_like_training(vec.table, vec.image, vec.text)
    for key, value in expected.items():
        assert info.metrics[key] == pytest.approx(value, abs=1e-12), key
