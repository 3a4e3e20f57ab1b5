"""``ccclip finetune``: contrastive fine-tuning from the command line.

Examples
--------
Train on the ``train`` split, evaluate on ``test``, resume if interrupted::

    ccclip finetune posts.csv --model ViT-B-32:laion2b_s34b_b79k --out runs/c-clip --eval-split test \\
        --epochs 10 --batch-size 128 --lock-text --unlock-last-text-blocks 2 --resume

Several GPUs (negatives span all of them)::

    torchrun --nproc_per_node 4 -m ccclip_widgets.train.cli finetune posts.csv --model ... --out runs/ddp

Runs standalone as ``python -m ccclip_widgets.train.cli finetune ...``; ``ccclip_widgets.cli`` adds the same
subcommand to ``ccclip`` through :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from .config import FineTuneConfig, add_config_arguments, config_from_args

__all__ = ["add_parser", "format_metrics", "main", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``finetune`` subcommand to an argparse ``subparsers`` object.

    Parameters
    ----------
    subparsers
        From ``parser.add_subparsers()``.

    Returns
    -------
    argparse.ArgumentParser
        The subcommand's parser (its ``func`` default is :func:`run`).
    """
    p = subparsers.add_parser(
        "finetune",
        help="contrastive fine-tuning (C-CLIP) with checkpoints and resume",
        description=(
            "Fine-tune a CLIP model contrastively on the image-text pairs of a posts table. Checkpoints go to "
            "--out; rerun with --resume to continue an interrupted run exactly. Under torchrun, every process "
            "trains a slice of each batch and negatives span all of them."
        ),
    )
    p.add_argument(
        "posts", help="training posts: CSV, TSV, Parquet or JSONL with post_id, image, text columns"
    )
    p.add_argument(
        "--model", required=True, help="model spec: demo, ARCH:TAG, ARCH:/weights, local-dir:DIR, DIR"
    )
    p.add_argument("--out", required=True, help="output folder: checkpoints, best/, final/, run.json")
    p.add_argument(
        "--image-root", default=None, help="folder image paths are relative to (default: the table's)"
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
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: best available)")
    p.add_argument(
        "--allow-random",
        action="store_true",
        help="allow ARCH:random (untrained weights), e.g. for smoke tests",
    )
    p.add_argument(
        "--check-images",
        default="header",
        choices=["none", "header", "full"],
        help="image checks when reading the posts (default: header)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p)
    p.set_defaults(func=run)
    return p


def _read(path: str, image_root: str | None, check: str) -> Any:
    from ..posts import read_posts

    return read_posts(path, image_root=image_root, check_images=check)  # type: ignore[arg-type]


def _split(posts: Any, value: str, keep: bool) -> Any:
    import polars as pl

    if "split" not in posts.table.columns:
        raise ValueError(
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
    from .metrics import metrics_frame

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


def run(args: argparse.Namespace) -> int:
    """Run ``finetune`` from parsed arguments; prints a summary and the final metrics table.

    Parameters
    ----------
    args
        From the parser built by :func:`add_parser`.

    Returns
    -------
    int
        Exit status: 0 success, 2 bad input, 3 training diverged.
    """
    from ..models import load_model
    from .checkpoint import find_checkpoint
    from .distributed import init_distributed
    from .loop import TrainingDivergedError, fine_tune

    base = None
    if args.config:
        base = FineTuneConfig.from_dict(json.loads(Path(args.config).read_text()))
    try:
        config = config_from_args(args, base=base)
    except ValueError as exc:
        print(f"ccclip finetune: error: {exc}", file=sys.stderr)
        return 2
    if args.no_progress:
        from dataclasses import replace

        config = replace(config, show_progress=False)

    device = args.device
    info = init_distributed(None if device is None else ("cuda" if str(device).startswith("cuda") else "cpu"))
    if info.enabled and device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{info.local_rank}"

    posts = _read(args.posts, args.image_root, args.check_images)
    eval_posts = None
    if args.eval_posts:
        eval_posts = _read(args.eval_posts, args.image_root, args.check_images)
    elif args.eval_split:
        eval_posts = _split(posts, args.eval_split, keep=True)
        if not args.train_split:
            posts = _split(posts, args.eval_split, keep=False)
    if args.train_split:
        posts = _split(posts, args.train_split, keep=True)

    resume = None
    if args.resume:
        # The run folder, not its newest checkpoint: a damaged newest checkpoint is then skipped (with a
        # warning) in favour of the previous intact one instead of stopping the run.
        resume = args.out if find_checkpoint(args.out) is not None else None
        if resume is None and info.is_main:
            print(f"no checkpoint in {args.out} yet: starting a new run")
    model = load_model(args.model, device=device, allow_random=args.allow_random)
    if info.is_main:
        print(
            f"model {model.name} ({args.model}) on {model.device}; {len(posts)} training posts"
            + (f", {len(eval_posts)} evaluation posts" if eval_posts is not None else "")
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            result = fine_tune(
                model, posts, config, eval_posts=eval_posts, resume_from=resume, out_dir=args.out
            )
    except TrainingDivergedError as exc:
        print(f"ccclip finetune: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:
        print(f"ccclip finetune: error: {exc}", file=sys.stderr)
        return 2
    if info.is_main:
        print(result.summary())
        if result.final_metrics:
            first = (
                result.eval_history[0]
                if result.eval_history and result.eval_history[0]["step"] == 0
                else None
            )
            print()
            print(format_metrics(result.final_metrics, first))
    if info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with the ``finetune`` subcommand (``python -m ccclip_widgets.train.cli``)."""
    parser = argparse.ArgumentParser(prog="python -m ccclip_widgets.train.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m ccclip_widgets.train.cli finetune ...``.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    import logging

    from ..models import ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelLoadError, FileNotFoundError) as exc:
        print(f"ccclip finetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command with --resume to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
