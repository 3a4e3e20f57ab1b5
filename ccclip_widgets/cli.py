"""``ccclip``: batch commands over the same backend the notebook widgets use.

Commands
--------
``ccclip embed POSTS --model SPEC --out DIR``
    Read a posts table, embed every image and text into a resumable store, print a summary.
``ccclip finetune POSTS --model SPEC --out DIR``
    Contrastive fine-tuning (C-CLIP) with checkpoints and resume.
``ccclip eval POSTS --model A [--model B]``
    Retrieval metrics per caption kind and language.
``ccclip demo``
    The offline demo: embed the demo posts, show the descriptive/commentative gap, fine-tune, open JupyterLab.

Run several processes with ``torchrun --nproc_per_node N -m ccclip_widgets.cli embed ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _add_embed(sub: Any) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a posts table into an on-disk store",
        description="Embed every post's image and text with a CLIP model. Re-running reuses finished work.",
    )
    p.add_argument("posts", help="posts table: CSV, TSV, Parquet or JSONL with post_id, image, text columns")
    p.add_argument(
        "--model", required=True, help="model spec: demo, ARCH:TAG, ARCH:/weights, local-dir:DIR, DIR"
    )
    p.add_argument("--out", required=True, help="output folder (store + rejects + summary)")
    p.add_argument(
        "--image-root", default=None, help="folder image paths are relative to (default: the table's)"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps, cpu (default: best available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="image-decoding worker processes")
    p.add_argument("--check-images", default="header", choices=["none", "header", "full"])
    p.add_argument(
        "--offline",
        action="store_true",
        help="air-gapped: never download image URLs (cached ones are used, others rejected as "
        "network_disabled); also set by CCCLIP_OFFLINE=1",
    )
    p.add_argument(
        "--download-workers", type=int, default=None, help="concurrent image downloads (default 16)"
    )
    p.add_argument("--allow-random", action="store_true", help="allow ARCH:random (untrained weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_embed(args: argparse.Namespace) -> int:
    import torch

    from .embed import embed_posts
    from .models import load_model
    from .posts import read_posts

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = args.device
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available() and device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
    rank = torch.distributed.get_rank() if distributed else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    download: dict[str, Any] = {"network": False} if args.offline else {}
    if args.download_workers is not None:
        download["download_workers"] = args.download_workers
    posts = read_posts(
        args.posts,
        image_root=args.image_root,
        check_images=args.check_images,
        show_progress=not args.no_progress,
        **download,
    )
    model = load_model(args.model, device=device, precision=args.precision, allow_random=args.allow_random)
    emb = embed_posts(
        posts,
        model,
        store=out / "store",
        batch_size=args.batch_size,
        num_workers=args.workers,
        show_progress=not args.no_progress,
    )
    if rank == 0:
        from ._io import atomic_write_json

        all_rejects = emb.posts.rejects
        rejects_path = None
        if len(all_rejects):
            rejects_path = emb.posts.write_rejects(out / "rejects.csv")
        summary = {
            "model_spec": model.spec,
            "model_fingerprint": model.fingerprint,
            "store": str(out / "store" / model.fingerprint),
            "posts_read": len(posts) + _n_rejected_rows(posts.rejects),
            "posts_embedded": len(emb),
            "rejected": _n_rejected_rows(all_rejects),
            "rejects_file": str(rejects_path) if rejects_path else None,
            **emb.stats,
        }
        atomic_write_json(out / "summary.json", summary)
        print(emb.summary())
        print(
            f"embedded now: {emb.stats['images_encoded']} images, {emb.stats['texts_encoded']} texts | "
            f"reused from cache: {emb.stats['images_reused']} images, {emb.stats['texts_reused']} texts | "
            f"rejected: {summary['rejected']} posts" + (f" (see {rejects_path})" if rejects_path else "")
        )
        print(f"store: {summary['store']}")
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _n_rejected_rows(rejects: Any) -> int:
    if rejects is None or len(rejects) == 0:
        return 0
    return int(rejects["row"].n_unique())


def build_parser() -> argparse.ArgumentParser:
    """The ``ccclip`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ccclip",
        description="Explore and fine-tune CLIP on social-media posts (C-CLIP), headless.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_embed(sub)
    for module in ("train.cli", "eval_cli", "demo.cli"):
        try:
            mod = __import__(f"ccclip_widgets.{module}", fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ccclip`` command.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from .models import ModelLoadError
    from .posts import PostsSchemaError

    try:
        if args.command == "embed":
            return _run_embed(args)
        return int(args.func(args) or 0)
    except (ModelLoadError, PostsSchemaError, FileNotFoundError) as exc:
        print(f"ccclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is saved; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
