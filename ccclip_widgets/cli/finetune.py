"""``ccclip finetune``: contrastive fine-tuning from the command line.

Examples
--------
Train on the ``train`` split, evaluate on ``test``, resume if interrupted::

    ccclip finetune posts.csv --model ViT-B-32:laion2b_s34b_b79k --out runs/c-clip --eval-split test \\
        --epochs 10 --batch-size 128 --lock-text --unlock-last-text-blocks 2 --resume

Several GPUs (negatives span all of them)::

    torchrun --nproc_per_node 4 -m ccclip_widgets.cli finetune posts.csv --model ... --out runs/ddp
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..errors import CCClipError, UsageError
from ..train.config import FineTuneConfig, add_config_arguments, config_from_args
from ._common import add_flags, finish_distributed, read_posts_checked, setup_distributed, stdout_line

__all__ = ["add_arguments", "format_metrics", "run"]

DESCRIPTION = (
    "Fine-tune a CLIP model contrastively on the image-text pairs of a posts table. Checkpoints go to "
    "--out; rerun with --resume to continue an interrupted run exactly. Under torchrun, every process "
    "trains a slice of each batch and negatives span all of them."
)
INTERRUPTED = "rerun the same command with --resume to continue"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` arguments: the shared flags, the data selection, and one flag per config field."""
    p.add_argument(
        "posts", help="training posts: CSV, TSV, Parquet or JSONL with post_id, image, text columns"
    )
    add_flags(
        p,
        "--model",
        "--out",
        "--image-root",
        "--device",
        "--allow-random",
        "--no-progress",
        model={"required": True},
        out={
            "required": True,
            "metavar": "DIR",
            "help": "output folder: checkpoints, best/, final/, run.json",
        },
    )
    evaluation = p.add_mutually_exclusive_group()
    evaluation.add_argument("--eval-posts", default=None, help="held-out posts file for evaluation")
    evaluation.add_argument(
        "--eval-split",
        default=None,
        help="evaluate on the rows whose 'split' column has this value (train on the rest)",
    )
    p.add_argument(
        "--train-split", default=None, help="train only on rows whose 'split' column has this value"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out, if any"
    )
    p.add_argument("--config", default=None, help="JSON file of FineTuneConfig fields (flags override it)")
    p.add_argument(
        "--check-images",
        default="header",
        choices=["none", "header", "full"],
        help="image checks when reading the posts (default: header)",
    )
    add_config_arguments(p)


def _split(posts: Any, value: str, keep: bool) -> Any:
    import polars as pl

    if "split" not in posts.table.columns:
        raise UsageError(
            f"--eval-split/--train-split need a 'split' column; the posts have {posts.table.columns}"
        )
    cond = pl.col("split") == value
    return posts.filter(cond if keep else (~cond | pl.col("split").is_null()))


def format_metrics(after: dict[str, float], before: dict[str, float] | None = None) -> str:
    """Plain-text table of retrieval metrics per direction and group, optionally beside a baseline.

    Parameters
    ----------
    after
        Flat metrics of the trained model.
    before
        Flat metrics before training (shown as ``before -> after``).

    Returns
    -------
    str
    """
    from ..train.metrics import metrics_frame

    frame = metrics_frame(after)
    if frame.height == 0:
        return "(no evaluation metrics)"
    cols = [("r_at_1", "R@1"), ("r_at_5", "R@5"), ("r_at_10", "R@10"), ("median_rank", "MedR")]

    def cell(key: str, metric: str) -> str:
        now = after.get(f"{key}/{metric}", math.nan)
        fmt = "{:.0f}" if metric == "median_rank" else "{:.3f}"
        if before is None or f"{key}/{metric}" not in before:
            return fmt.format(now)
        return f"{fmt.format(before[f'{key}/{metric}'])}->{fmt.format(now)}"

    rows = [["direction", "group", "n", *(c[1] for c in cols)]]
    for r in frame.iter_rows(named=True):
        key = f"{r['direction']}/{r['group']}"
        rows.append([r["direction"], r["group"], str(r["n_queries"]), *(cell(key, m) for m, _ in cols)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> FineTuneConfig:
    base = None
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config file not found: {path}")
        try:
            base = FineTuneConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--config {path}: {exc}") from exc
    try:
        config = config_from_args(args, base=base)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    if args.no_progress:
        from dataclasses import replace

        config = replace(config, show_progress=False)
    return config


def run(args: argparse.Namespace) -> int:
    """Run ``finetune`` from parsed arguments; prints a summary and the final metrics table.

    Returns
    -------
    int
        0; failures raise (the exit code comes from the error, see ``docs/cli.md``).
    """
    from ..models import load_model
    from ..train.checkpoint import find_checkpoint
    from ..train.loop import fine_tune

    config = _config(args)
    info, device = setup_distributed(args.device)
    out = Path(args.out)
    read = {"image_root": args.image_root, "check_images": args.check_images}
    posts = read_posts_checked(args.posts, rejects_to=out / "rejects.csv" if info.is_main else None, **read)
    eval_posts = None
    if args.eval_posts:
        eval_to = out / "eval_rejects.csv" if info.is_main else None
        eval_posts = read_posts_checked(args.eval_posts, rejects_to=eval_to, **read)
    elif args.eval_split:
        eval_posts = _split(posts, args.eval_split, keep=True)
        if not args.train_split:
            posts = _split(posts, args.eval_split, keep=False)
    if args.train_split:
        posts = _split(posts, args.train_split, keep=True)
    if len(posts) == 0:
        raise UsageError("no training posts are left after the split selection (--train-split/--eval-split)")

    resume = None
    if args.resume:
        # The run folder, not its newest checkpoint: a damaged newest checkpoint is then skipped (with a
        # warning) in favour of the previous intact one instead of stopping the run.
        resume = args.out if find_checkpoint(args.out) is not None else None
        if resume is None and info.is_main:
            stdout_line(f"no checkpoint in {args.out} yet: starting a new run")
    model = load_model(args.model, device=device, allow_random=args.allow_random)
    if info.is_main:
        stdout_line(
            f"model {model.name} ({args.model}) on {model.device}; {len(posts)} training posts"
            + (f", {len(eval_posts)} evaluation posts" if eval_posts is not None else "")
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            result = fine_tune(
                model, posts, config, eval_posts=eval_posts, resume_from=resume, out_dir=args.out
            )
    except ValueError as exc:
        if isinstance(exc, CCClipError):
            raise
        # fine_tune checks its inputs with ValueError (settings that cannot work with these posts)
        raise UsageError(str(exc)) from exc
    if info.is_main:
        stdout_line(result.summary())
        if result.final_metrics:
            first = (
                result.eval_history[0]
                if result.eval_history and result.eval_history[0]["step"] == 0
                else None
            )
            stdout_line("")
            stdout_line(format_metrics(result.final_metrics, first))
    finish_distributed(info)
    return 0
