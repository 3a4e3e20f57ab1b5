"""``ccclip eval``: two models on a tiny CSV, table printed and written to CSV and Parquet atomically."""

from __future__ import annotations

import argparse
import re
import warnings

import polars as pl
import pytest
from ccclip_testkit import make_shape_posts

from ccclip_widgets.cli import build_parser, main
from ccclip_widgets.cli import eval as eval_cmd
from ccclip_widgets.models import save_checkpoint

EXPECTED = {
    "model",
    "direction",
    "caption_kind",
    "lang",
    "n_queries",
    "pool_size",
    "r_at_1",
    "r_at_1_lo",
    "r_at_1_hi",
    "r_at_5",
    "r_at_5_lo",
    "r_at_5_hi",
    "r_at_10",
    "r_at_10_lo",
    "r_at_10_hi",
    "median_rank",
    "mean_rank",
}


def _posts_csv(tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")[:12]
    recs += [
        dict(
            r,
            post_id=r["post_id"] + "c",
            text=f"honestly this made my {day}",
            caption_kind="commentative",
            lang=lang,
        )
        for r, day, lang in zip(
            recs[:8], ["day", "week", "monday", "year"] * 2, ["en", "de"] * 4, strict=True
        )
    ]
    path = tmp_path / "posts.csv"
    pl.DataFrame(recs).drop("split").write_csv(path)
    return path


def _parser() -> argparse.ArgumentParser:
    return build_parser(["eval"])


@pytest.fixture
def two_models(tiny_model, tiny_arch, tmp_path):
    import torch

    from ccclip_widgets.models import load_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        other = load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)
    a = save_checkpoint(tiny_model, tmp_path / "model_a")
    b = save_checkpoint(other, tmp_path / "model_b")
    return a, b


def test_eval_two_models_writes_csv_and_parquet(two_models, tmp_path, capsys):
    posts = _posts_csv(tmp_path)
    a, b = two_models
    store = tmp_path / "store"
    for out in (tmp_path / "out" / "gap.csv", tmp_path / "out" / "gap.parquet"):
        args = _parser().parse_args(
            ["eval", str(posts), "--image-root", str(tmp_path / "imgs"), "--model", f"before={a}", "--model", f"after={b}", "--store", str(store),
             "--out", str(out), "--n-boot", "200", "--no-progress", "--workers", "0"]
        )  # fmt: skip
        assert args._module is eval_cmd
        assert eval_cmd.run(args) == 0
        df = pl.read_csv(out) if out.suffix == ".csv" else pl.read_parquet(out)
        assert EXPECTED <= set(df.columns)
        assert set(df["model"].unique().to_list()) == {"before", "after"}
        assert set(df["direction"].unique().to_list()) == {"text_to_image", "image_to_text"}
        assert set(df["caption_kind"].unique().to_list()) == {"descriptive", "commentative"}
        # descriptive/en 12 posts; commentative: 4 en + 4 de
        t2i = df.filter((pl.col("direction") == "text_to_image") & (pl.col("model") == "before"))
        assert sorted(t2i["n_queries"].to_list()) == [4, 4, 12]
        assert ((df["r_at_5_lo"] <= df["r_at_5"]) & (df["r_at_5"] <= df["r_at_5_hi"])).all()
        assert not list(out.parent.glob(".*.tmp"))  # no temporary file left behind
    printed = capsys.readouterr()
    assert "t2i R@5" in printed.out and "before" in printed.out and "after" in printed.out
    # the second run found every vector in the store
    assert len(re.findall(r"\b0 images and 0 texts encoded now", printed.err)) == 2


def test_eval_through_the_main_cli(two_models, tmp_path, capsys):
    posts = _posts_csv(tmp_path)
    a, _ = two_models
    out = tmp_path / "t.parquet"
    rc = main(["eval", str(posts), "--image-root", str(tmp_path / "imgs"), "--model", str(a), "--group-by", "lang", "--out", str(out),
               "--no-progress", "--workers", "0", "--store", str(tmp_path / "s")])  # fmt: skip
    assert rc == 0
    df = pl.read_parquet(out)
    assert "lang" in df.columns and "caption_kind" not in df.columns
    assert df["model"].unique().to_list() == [str(a)]


def test_eval_rejects_bad_arguments(two_models, tmp_path, capsys):
    posts = _posts_csv(tmp_path)
    a, _ = two_models
    base = ["eval", str(posts), "--image-root", str(tmp_path / "imgs"), "--model", str(a), "--no-progress"]
    cases = [
        ([*base, "--out", str(tmp_path / "t.xlsx")], 2, ".csv or .parquet"),
        ([*base, "--split", "test"], 2, "no split column"),
        ([*base, "--group-by", "nope"], 2, "nope"),
        (["eval", str(posts), "--model", str(a), "--out", str(tmp_path / "x.csv")], 5, "missing_image"),
    ]
    for argv, code, text in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.startswith("ccclip eval: error: ") and err.count("\n") == 1 and text in err, err
    # an input with no usable row writes its rejects next to --out before failing
    assert pl.read_csv(tmp_path / "x.rejects.csv")["reason"].unique().to_list() == ["missing_image"]
    assert not (tmp_path / "x.csv").exists()


def test_parse_model_arg(tmp_path):
    assert eval_cmd.parse_model_arg("base=demo") == ("base", "demo")
    assert eval_cmd.parse_model_arg("ViT-B-32:laion2b_s34b_b79k") == ("ViT-B-32:laion2b_s34b_b79k",) * 2
    assert eval_cmd.parse_model_arg("/x/a=b") == ("/x/a=b", "/x/a=b")
    weird = tmp_path / "a=b"
    weird.mkdir()
    assert eval_cmd.parse_model_arg(str(weird)) == (str(weird), str(weird))
