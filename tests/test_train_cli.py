"""``ccclip finetune`` end to end on a tiny CSV with a random tiny model."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from ccclip_testkit import make_shape_posts

from ccclip_widgets.cli import build_parser, main
from ccclip_widgets.cli.finetune import format_metrics
from ccclip_widgets.models import load_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def posts_csv(tmp_path):
    records = make_shape_posts(tmp_path / "imgs", n_per=2)
    for i, r in enumerate(records):
        r["split"] = "test" if i % 4 == 0 else "train"
    path = tmp_path / "posts.csv"
    pl.DataFrame(records).write_csv(path)
    return path


def test_cli_finetune_end_to_end_and_resume(tiny_arch, posts_csv, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "finetune",
        str(posts_csv),
        "--model",
        f"{tiny_arch}:random",
        "--allow-random",
        "--image-root",
        str(tmp_path / "imgs"),
        "--out",
        str(out),
        "--eval-split",
        "test",
        "--max-steps",
        "3",
        "--batch-size",
        "12",
        "--lr",
        "1e-3",
        "--checkpoint-every-steps",
        "2",
        "--lock-image",
        "--unlock-last-image-blocks",
        "1",
        "--no-progress",
    ]
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "36 training posts, 12 evaluation posts" in printed
    assert "3/3 steps (finished)" in printed
    assert "text_to_image" in printed and "R@10" in printed and "->" in printed  # before -> after table
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["config"]["lock_image"] and run["config"]["batch_size"] == 12
    model = load_model(out / "final", device="cpu")
    assert model.name == tiny_arch
    # --resume on a finished run continues from its last checkpoint and has nothing left to do
    with pytest.warns(UserWarning, match="RANDOM"):
        assert main([*argv, "--resume"]) == 0
    assert "3/3 steps" in capsys.readouterr().out


def test_cli_reports_bad_options_without_a_traceback(tiny_arch, posts_csv, tmp_path, capsys):
    argv = ["finetune", str(posts_csv), "--model", f"{tiny_arch}:random", "--out", str(tmp_path / "o")]
    argv += ["--image-root", str(tmp_path / "imgs")]
    assert main([*argv, "--allow-random", "--unlock-last-text-blocks", "2"]) == 2
    err = capsys.readouterr().err
    assert "set lock_text=True" in err and err.count("\n") == 1 and err.startswith("ccclip finetune: error:")
    assert main(argv) == 6  # random weights without --allow-random: the model cannot be loaded
    err = capsys.readouterr().err
    assert "allow_random" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main([*argv, "--config", str(tmp_path / "nope.json")]) == 5
    assert "nope.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["finetune", str(posts_csv), "--model", "x", "--out", "o", "--precision", "fp8"]
        )


def test_config_file_and_flags_combine(tiny_arch, posts_csv, tmp_path):
    from ccclip_widgets.train import FineTuneConfig
    from ccclip_widgets.train.config import config_from_args

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(FineTuneConfig(epochs=2, lr=5e-4, lock_text=True).to_dict()))
    args = build_parser().parse_args(
        ["finetune", str(posts_csv), "--model", "m", "--out", "o", "--config", str(cfg_file), "--lr", "1e-4"]
    )
    base = FineTuneConfig.from_dict(json.loads(cfg_file.read_text()))
    cfg = config_from_args(args, base=base)
    assert cfg.epochs == 2 and cfg.lr == 1e-4 and cfg.lock_text


def test_format_metrics_table():
    metrics = {
        "text_to_image/all/r_at_1": 0.5,
        "text_to_image/all/median_rank": 2.0,
        "text_to_image/all/n_queries": 4,
    }
    text = format_metrics(metrics, {"text_to_image/all/r_at_1": 0.25, "text_to_image/all/median_rank": 3.0})
    assert "0.250->0.500" in text and "3->2" in text
    assert format_metrics({}) == "(no evaluation metrics)"
