"""Gap widget state: chart bars and error bars, table equal to evaluate_retrieval, try-a-caption, live updates."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from ccclip_testkit import load_tiny, make_shape_posts

from ccclip_widgets.embed import embed_posts, encode_images, encode_texts
from ccclip_widgets.evaluate import evaluate_retrieval
from ccclip_widgets.posts import read_posts
from ccclip_widgets.widgets.gap import Gap

COMMENTS = ["this is so me on a monday", "no words", "can't stop laughing", "mood", "vibes tbh", "ugh, again"]


@pytest.fixture(scope="module")
def gap_posts(tmp_path_factory):
    """24 descriptive English posts plus 12 commentative ones (en/de) that reuse 12 of the images."""
    folder = tmp_path_factory.mktemp("gap") / "imgs"
    recs = make_shape_posts(folder)
    recs = [dict(r, split="test" if i % 4 == 3 else "train") for i, r in enumerate(recs)]
    recs += [
        dict(r, post_id=f"c{i:03d}", text=COMMENTS[i % len(COMMENTS)] + f" #{i}", caption_kind="commentative",
             lang="en" if i % 2 else "de")
        for i, r in enumerate(recs[:12])
    ]  # fmt: skip
    return read_posts(pl.DataFrame(recs), image_root=folder)


@pytest.fixture(scope="module")
def tiny_model(tiny_arch):
    """Module-wide tiny model (the tests here never change its weights)."""
    return load_tiny(tiny_arch, 0)


@pytest.fixture(scope="module")
def other_model(tiny_arch):
    return load_tiny(tiny_arch, 1)


@pytest.fixture(scope="module")
def two(gap_posts, tiny_model, other_model, tmp_path_factory):
    kw = {"store": tmp_path_factory.mktemp("store"), "show_progress": False, "num_workers": 0}
    return embed_posts(gap_posts, tiny_model, **kw), embed_posts(gap_posts, other_model, **kw)


def _x(trace):
    """A bar trace's categories as (caption kind, language) pairs (plotly's two-level axis)."""
    outer, inner = trace.x
    return list(zip(outer, inner, strict=True))


def test_chart_has_kinds_and_languages_both_models_error_bars_chance_and_legend(two, tiny_model, other_model):
    before, after = two
    gap = Gap(
        {"before": before, "after": after},
        clip_models={"before": tiny_model, "after": other_model},
        n_boot=200,
    )
    fig = gap.figure
    assert "ccclip-gap-chart" in fig._dom_classes
    assert fig.layout.showlegend is True
    names = [t.name for t in fig.data]
    assert names[:2] == ["before", "after"] and names[2].startswith("chance (R@5 = ")
    chart = gap.chart_table
    groups = [("descriptive", "en"), ("commentative", "en"), ("commentative", "de")]
    for trace in fig.data[:2]:
        assert trace.type == "bar"
        assert _x(trace) == groups  # languages are in the chart, descriptive first
        err = trace.error_y
        assert err.visible and len(err.array) == len(err.arrayminus) == 3
        assert min(err.array) >= 0 and min(err.arrayminus) >= 0
        for (kind, lang), y, up, down in zip(_x(trace), trace.y, err.array, err.arrayminus, strict=True):
            row = chart.filter(
                (pl.col("model") == trace.name) & (pl.col("caption_kind") == kind) & (pl.col("lang") == lang)
            ).row(0, named=True)
            assert y == pytest.approx(row["r_at_5"])
            assert y + up == pytest.approx(row["r_at_5_hi"])
            assert y - down == pytest.approx(row["r_at_5_lo"])
    # every group is ranked against the same pool (all 24 images): one chance level
    assert set(chart["pool_size"].to_list()) == {24}
    assert list(fig.data[2].y) == pytest.approx([5 / 24] * 3)
    assert "R@5" in fig.layout.title.text and "95% CI" in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "caption kind / language"
    gap.set_k(10).set_direction("image_to_text")
    assert "R@10" in fig.layout.title.text and "image" in fig.layout.title.text
    row = gap.chart_table.filter(
        (pl.col("model") == "after") & (pl.col("caption_kind") == "commentative") & (pl.col("lang") == "en")
    )
    assert fig.data[1].y[1] == pytest.approx(row["r_at_10"][0])
    gap.set_chart_by("caption_kind")
    assert list(fig.data[0].x) == ["descriptive", "commentative"]


def test_a_small_group_does_not_look_better_for_its_smaller_pool(two):
    before, _ = two
    gap = Gap({"m": before}, n_boot=0)
    own = Gap({"m": before}, n_boot=0, pool="group")
    de = pl.col("lang") == "de"
    assert gap.chart_table.filter(de)["pool_size"].item() == 24
    assert own.chart_table.filter(de)["pool_size"].item() == 6  # ranked among its own 6 images only
    spec = own.chart_spec()
    assert spec["chance"][spec["groups"].index(("commentative", "de"))] == pytest.approx(5 / 6)


def test_table_matches_evaluate_retrieval(two):
    before, after = two
    gap = Gap({"before": before, "after": after}, n_boot=300, seed=3)
    expected = pl.concat(
        [
            evaluate_retrieval({name: (e.image, e.text)}, e.posts.table, group_by=("caption_kind", "lang"),
                               n_boot=300, seed=3)
            for name, e in (("before", before), ("after", after))
        ]
    )  # fmt: skip
    assert_frame_equal(gap.table, expected)
    # the HTML table shows one row per group and a column block per model
    html = gap.view.control("table").value
    assert "ccclip-gap-table" in gap.view.control("table")._dom_classes
    assert html.count("<tr>") == 2 + 3  # two header rows + descriptive/en, commentative/de, commentative/en
    assert 'data-model="before"' in html and 'data-model="after"' in html
    gap.set_group_by("lang")
    assert gap.group_by == ("lang",)
    assert "caption_kind" not in gap.table.columns and set(gap.table["lang"].to_list()) == {"en", "de"}
    gap.select("after")
    assert gap.table["model"].unique().to_list() == ["after"]
    assert [t.name for t in gap.figure.data if t.type == "bar"] == ["after"]


def test_try_caption_returns_the_brute_force_top_images(two, gap_posts, tiny_model, other_model):
    before, after = two
    gap = Gap(
        {"before": before, "after": after}, clip_models={"before": tiny_model, "after": other_model}, top_n=4
    )
    caption = "a red circle, what a day"
    results = gap.try_caption(caption)
    assert set(results) == {"before", "after"} and gap.caption_results is results
    table = gap_posts.table
    first_post = table.unique("image_key", keep="first", maintain_order=True)
    for name, model in (("before", tiny_model), ("after", other_model)):
        q = encode_texts(model, [caption])[0]
        vecs = encode_images(model, first_post["image_path"].to_list())
        order = np.argsort(-(vecs @ q), kind="stable")[:4]
        expected = first_post["post_id"].gather(order).to_list()
        assert results[name]["post_id"].to_list() == expected
        assert results[name]["rank"].to_list() == [1, 2, 3, 4]
        assert results[name]["image_key"].n_unique() == 4  # a shared image appears once
    w = gap.widget
    try_box = w.children[4]
    assert "ccclip-gap-try" in try_box._dom_classes
    html = try_box.children[2].value
    for pid in results["before"]["post_id"]:
        assert f'data-post-id="{pid}"' in html
    assert html.count("<img") == 8  # thumbnails, 4 per model side by side


def test_caption_box_widget_fills_results(two, tiny_model):
    before, _ = two
    gap = Gap({"before": before}, clip_models={"before": tiny_model}, top_n=3)
    gap.widget  # noqa: B018 - built as the notebook shows it
    text, button = gap.view.control("caption"), gap.view.control("search")
    text.value = "a blue square"  # the front end sets the value; pressing Enter submits it
    assert gap.caption_results["before"].height == 3
    gap.caption_results = {}
    button.click()
    assert gap.caption_results["before"].height == 3
    assert 'data-model="before"' in gap.view.control("results").value


def test_controls_drive_the_state(two):
    before, after = two
    gap = Gap({"before": before, "after": after}, n_boot=100)
    models, groups, k, direction = (gap.view.control(c) for c in ("models", "group_by", "k", "direction"))
    k.value = "R@1"
    assert gap.k == 1 and "R@1" in gap.figure.layout.title.text
    direction.value = "image_to_text"
    assert gap.direction == "image_to_text"
    groups.value = ("lang",)
    assert gap.group_by == ("lang",)
    models.value = ("before",)
    assert gap.selected == ["before"] and [t.name for t in gap.figure.data if t.type == "bar"] == ["before"]
    assert k.style.button_width == "auto"  # "R@10" is never cut to "R@..."


def test_live_update_when_fed_a_new_model(two, gap_posts, tiny_model, other_model):
    before, after = two
    gap = Gap({"before": before}, clip_models={"before": tiny_model}, n_boot=100)
    fig = gap.figure
    _ = gap.widget

    def bars():
        return [t.name for t in fig.data if t.type == "bar"]

    assert bars() == ["before"]

    class FakeFineTune:
        def __init__(self):
            self.live, self.done = [], []

        def on_live_embeddings(self, cb, remove=False):
            (self.live.remove if remove else self.live.append)(cb)

        def on_reembedded(self, cb, remove=False):
            (self.done.remove if remove else self.done.append)(cb)

    ft = FakeFineTune()
    gap.connect(ft, name="tuned")
    gap.try_caption("a green triangle")

    class Info:
        step = 7

    for cb in ft.live:
        cb(after, Info())
    assert bars() == ["before", "tuned"]
    assert "step 7" in gap.view.control("table").value
    assert "tuned" not in gap.caption_results  # no model to encode captions while training
    expected = evaluate_retrieval({"tuned": (after.image, after.text)}, after.posts.table, n_boot=100)
    assert_frame_equal(gap.table.filter(pl.col("model") == "tuned"), expected)

    for cb in ft.done:
        cb(after, other_model)
    assert gap.caption_results["tuned"].height == gap.top_n  # the caption box re-ran with the new model
    gap.disconnect(ft)
    assert ft.live == [] and ft.done == []
    gap.remove_model("tuned")
    assert bars() == ["before"]


def test_split_and_posts_without_caption_kind(gap_posts, two):
    emb = two[0]
    gap = Gap({"m": emb}, split="test", n_boot=50)
    assert gap.table["n_queries"].sum() == 2 * int((gap_posts.table["split"] == "test").sum())
    plain = gap_posts.table.drop("caption_kind")
    emb2 = type(emb)(posts=type(gap_posts)(table=plain), image=emb.image, text=emb.text,
                     model_fingerprint="x", model_spec="x", rejects=emb.rejects)  # fmt: skip
    gap2 = Gap({"m": emb2}, n_boot=50)
    assert list(gap2.figure.data[0].x) == ["en", "de"]  # no caption kind: bars by language only
    gap2.set_chart_by()
    assert list(gap2.figure.data[0].x) == ["all posts"]
    with pytest.raises(ValueError, match="k must be"):
        gap2.set_k(3)
    with pytest.raises(KeyError, match="no model named"):
        gap2.select("nope")
