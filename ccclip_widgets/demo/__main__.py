"""Command line for the offline demo: ``python -m ccclip_widgets.demo build-data``.

Sub-commands
------------
build-data
    Build ``data/demo`` and the stand-in pool from Debian's openclipart packages
    (:func:`ccclip_widgets.demo.data.build_demo_data`).
build-model
    Train the demo model's image tower on the stand-in pool and write ``data/models/demo-clip``
    (:func:`ccclip_widgets.demo.model.build_demo_model`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ccclip_widgets.demo", description="Build the offline demo data and model."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser(
        "build-data",
        help="build data/demo and the stand-in pool from the openclipart Debian packages",
        description="Build data/demo (thumbnails + posts.parquet) and the stand-in pool from openclipart.",
    )
    data.add_argument("--out", type=Path, default=None, help="demo folder (default: <repo>/data/demo)")
    data.add_argument(
        "--standin-dir",
        type=Path,
        default=None,
        help="stand-in pool folder (default: ~/.cache/ccclip_widgets/standin)",
    )
    data.add_argument("--png-root", type=Path, default=None, help="openclipart PNG folder")
    data.add_argument("--svg-root", type=Path, default=None, help="openclipart SVG folder")
    data.add_argument("--captions-dir", type=Path, default=None, help="folder of commentative_*.csv files")
    data.add_argument("--n-demo", type=int, default=1600, help="number of demo images (default: 1600)")
    data.add_argument("--seed", type=int, default=0, help="selection and split seed (default: 0)")
    data.add_argument("--workers", type=int, default=None, help="PNG decoding processes")
    data.add_argument(
        "--no-install", action="store_true", help="do not apt-get install missing openclipart packages"
    )
    data.add_argument(
        "--allow-missing-captions",
        action="store_true",
        help="build even if demo images lack commentative captions or captions name unknown images",
    )
    data.add_argument(
        "--reselect",
        action="store_true",
        help="recompute the demo selection instead of reading it from the existing worklist (changes which "
        "images the caption files must describe)",
    )
    data.add_argument("--json", action="store_true", help="print the full summary as JSON")

    model = sub.add_parser("build-model", help="train the demo model (stand-in for stock CLIP)")
    model.add_argument("--standin-dir", type=Path, default=None, help="stand-in pool (default: cache folder)")
    model.add_argument(
        "--out", type=Path, default=None, help="checkpoint folder (default: data/models/demo-clip)"
    )
    model.add_argument(
        "--grid",
        nargs="+",
        default=["80:3e-3:0"],
        help="epochs:lr:seed[:weight_decay] settings; the best on held-out stand-in images is kept",
    )
    model.add_argument("--work-dir", type=Path, default=None, help="intermediate checkpoints (resume)")
    return parser


def _print_summary(summary: dict) -> None:
    print(f"source files: {summary['source_files']}")
    print(f"dropped: {summary['dropped_total']}")
    for reason, n in summary["dropped"].items():
        print(f"  {reason}: {n}")
    print("text fixes:")
    for reason, n in summary["text_notes"].items():
        print(f"  {reason}: {n}")
    print(
        f"good images: {summary['good_images']} in {summary['near_duplicate_groups']} near-duplicate groups"
    )
    print(
        f"demo: {summary['demo_images']} images ({summary['demo_train_images']} train, "
        f"{summary['demo_test_images']} test; selection from {summary['selection']}), "
        f"{summary['demo_posts']} posts, commentative by language: {summary['demo_commentative_posts'] or 'none'}"
    )
    print(f"stand-in pool: {summary['standin_images']} images")
    for key in ("missing_captions", "unknown_caption_ids", "invalid_caption_rows"):
        items = summary[key]
        if items:
            shown = ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
            print(f"{key}: {len(items)} ({shown})")
    print(f"demo size: {summary['demo_bytes'] / 1e6:.2f} MB in {summary['out_dir']}")
    print(f"stand-in size: {summary['standin_bytes'] / 1e6:.2f} MB in {summary['standin_dir']}")
    print(f"worklist: {summary['worklist']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo command line.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 on a data or caption error.
    """
    args = _parser().parse_args(argv)
    if args.command == "build-model":
        from .model import build_demo_model

        try:
            out = build_demo_model(
                args.standin_dir,
                args.out,
                grid=tuple(args.grid),
                work_dir=args.work_dir,
            )
        except FileNotFoundError as exc:
            print(f"error: {exc} (run `python -m ccclip_widgets.demo build-data` first)", file=sys.stderr)
            return 1
        print(f"demo model written to {out}")
        return 0

    from .data import DEFAULT_PNG_ROOT, DEFAULT_SVG_ROOT, CaptionError, build_demo_data

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = build_demo_data(
            out_dir=args.out,
            standin_dir=args.standin_dir,
            png_root=args.png_root or DEFAULT_PNG_ROOT,
            svg_root=args.svg_root or DEFAULT_SVG_ROOT,
            n_demo=args.n_demo,
            seed=args.seed,
            install_missing=not args.no_install,
            captions_dir=args.captions_dir,
            allow_missing_captions=args.allow_missing_captions,
            workers=args.workers,
            pin_to_worklist=not args.reselect,
        )
    except (CaptionError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
