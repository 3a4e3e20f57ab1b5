"""``ccclip embed``: embed every post's image and text with a CLIP model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_flags, finish_distributed, read_posts_checked, setup_distributed, stdout_line

DESCRIPTION = (
    "Embed every post's image and text with a CLIP model. --out receives embeddings.parquet (one row per "
    "embedded post: post_id, image_embedding, text_embedding, the store keys and the posts' own columns), the "
    "store of vectors (keyed by model and content, so re-running reuses finished work), rejects.csv (rows that "
    "could not be used, with reasons) and summary.json. Under torchrun every process embeds a share of the posts."
)
INTERRUPTED = "finished work is saved; run the same command again to resume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``embed`` arguments."""
    p.add_argument("posts", help="posts table: CSV, TSV, Parquet or JSONL with post_id, image, text columns")
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
            "help": "output folder (embeddings.parquet, store/, rejects.csv, summary.json)",
        },
    )
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


def run(args: argparse.Namespace) -> int:
    """Embed, then write the store, rejects and summary into ``--out``; returns the exit status."""
    import dataclasses

    from .._io import atomic_write_json
    from ..embed import embed_posts
    from ..fetch import FetchConfig
    from ..models import load_model

    info, device = setup_distributed(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    download = FetchConfig(network=False if args.offline else None)
    if args.download_workers is not None:
        download = dataclasses.replace(download, workers=args.download_workers)
    posts = read_posts_checked(
        args.posts,
        image_root=args.image_root,
        rejects_to=out / "rejects.csv" if info.is_main else None,
        check_images=args.check_images,
        show_progress=not args.no_progress,
        fetcher=download,
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
    if info.is_main:
        all_rejects = emb.posts.rejects
        rejects_path = emb.posts.write_rejects(out / "rejects.csv") if len(all_rejects) else None
        per_post = emb.write_parquet(out / "embeddings.parquet") if len(emb) else None
        summary = {
            "model_spec": model.spec,
            "model_fingerprint": model.fingerprint,
            "embeddings": str(per_post) if per_post else None,
            "store": str(out / "store" / model.fingerprint),
            "posts_read": len(posts) + posts.n_rejected,
            "posts_embedded": len(emb),
            "rejected": emb.posts.n_rejected,
            "rejects_file": str(rejects_path) if rejects_path else None,
            **emb.stats,
        }
        atomic_write_json(out / "summary.json", summary)
        stdout_line(emb.summary())
        stdout_line(
            f"embedded now: {emb.stats['images_encoded']} images, {emb.stats['texts_encoded']} texts | "
            f"reused from cache: {emb.stats['images_reused']} images, {emb.stats['texts_reused']} texts | "
            f"rejected: {summary['rejected']} posts" + (f" (see {rejects_path})" if rejects_path else "")
        )
        stdout_line(f"per-post embeddings: {per_post}" if per_post else "no post embedded")
        stdout_line(f"store: {summary['store']}")
    if len(emb) == 0:  # every image failed to decode: the rejects are written, the run failed
        emb.posts.require_usable(rejects_file=out / "rejects.csv")
    finish_distributed(info)
    return 0
