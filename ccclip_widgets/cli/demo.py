"""``ccclip demo``: the offline C-CLIP story end to end, and the builders of its data and model.

``ccclip demo`` embeds the demo posts' test split with the demo model (a stand-in for stock CLIP that only saw
descriptive captions), prints retrieval for descriptive vs commentative captions per language, fine-tunes a
demo C-CLIP on the commentative train split, prints both models side by side, saves the table and opens
JupyterLab on the Explorer notebook (``--no-lab`` stays headless). Every step reuses its cache on later runs.

``ccclip demo build-data`` and ``ccclip demo build-model`` rebuild ``data/demo`` and the demo model from Debian's
openclipart packages (also reachable as ``python -m ccclip_widgets.demo build-data|build-model``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputDataError
from ._common import add_flags, stdout_line

DESCRIPTION = __doc__
INTERRUPTED = "finished steps are cached; run the same command again to go on"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` arguments and its ``build-data`` / ``build-model`` subcommands."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_flags(
        p,
        "--out",
        "--device",
        "--no-progress",
        out={
            "default": None,
            "metavar": "DIR",
            "help": "work folder (default: ~/.cache/ccclip_widgets/demo)",
        },
    )
    p.add_argument("--no-lab", action="store_true", help="do not open JupyterLab at the end")
    p.add_argument("--smoke", action="store_true", help="tiny subset and a few steps (for CI)")
    p.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs (default 10; smoke: 1 epoch of 3 steps)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="JupyterLab port")

    from ._common import Parser, add_global_flags

    sub = p.add_subparsers(dest="demo_command", metavar="BUILDER", parser_class=Parser)
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
    add_global_flags(data)

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
    model.add_argument("--work-dir", type=Path, default=None, help="features and trainer output")
    add_global_flags(model)


def run(args: argparse.Namespace) -> int:
    """Run the demo, or one of its builders; returns the exit status."""
    if args.demo_command == "build-data":
        return _build_data(args)
    if args.demo_command == "build-model":
        return _build_model(args)
    from ..demo.cli import open_lab, run_demo

    smoke = args.smoke or os.environ.get("CCCLIP_SMOKE") == "1"
    out = run_demo(
        out_dir=args.out,
        smoke=smoke,
        device=args.device,
        epochs=args.epochs,
        seed=args.seed,
        show_progress=not args.no_progress,
    )
    if args.no_lab:
        return 0
    return open_lab(port=args.port, work_dir=out)


def _build_model(args: argparse.Namespace) -> int:
    from ..demo.model import build_demo_model

    try:
        out = build_demo_model(
            args.standin_dir,
            args.out,
            grid=tuple(args.grid),
            work_dir=args.work_dir,
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (run `ccclip demo build-data` first)") from exc
    stdout_line(f"demo model written to {out}")
    return 0


def _build_data(args: argparse.Namespace) -> int:
    import logging

    from ..demo.data import DEFAULT_PNG_ROOT, DEFAULT_SVG_ROOT, CaptionError, build_demo_data

    logging.getLogger("ccclip_widgets.demo").setLevel(logging.INFO)  # progress of a long build
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
    except (CaptionError, ValueError) as exc:
        if isinstance(exc, (CaptionError, InputDataError)):
            raise
        raise InputDataError(str(exc)) from exc
    if args.json:
        stdout_line(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any]) -> None:
    out = stdout_line
    out(f"source files: {summary['source_files']}")
    out(f"dropped: {summary['dropped_total']}")
    for reason, n in summary["dropped"].items():
        out(f"  {reason}: {n}")
    out("text fixes:")
    for reason, n in summary["text_notes"].items():
        out(f"  {reason}: {n}")
    out(f"good images: {summary['good_images']} in {summary['near_duplicate_groups']} near-duplicate groups")
    out(
        f"demo: {summary['demo_images']} images ({summary['demo_train_images']} train, "
        f"{summary['demo_test_images']} test; selection from {summary['selection']}), "
        f"{summary['demo_posts']} posts, commentative by language: {summary['demo_commentative_posts'] or 'none'}"
    )
    out(f"stand-in pool: {summary['standin_images']} images")
    for key in ("missing_captions", "unknown_caption_ids", "invalid_caption_rows"):
        items = summary[key]
        if items:
            shown = ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")
            out(f"{key}: {len(items)} ({shown})")
    out(f"demo size: {summary['demo_bytes'] / 1e6:.2f} MB in {summary['out_dir']}")
    out(f"stand-in size: {summary['standin_bytes'] / 1e6:.2f} MB in {summary['standin_dir']}")
    out(f"worklist: {summary['worklist']}")
