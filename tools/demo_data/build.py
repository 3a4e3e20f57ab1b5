"""The pipeline: :func:`build_demo_data` runs scan, text filter, image analysis, grouping, selection, writing.

It builds the demo set (``data/demo``) and, through :func:`ccclip_widgets.demo.standin.build_standin_pool`,
the stand-in pool, and returns a summary that counts every dropped file by reason.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ccclip_widgets._io import repo_data_dir

from .captions import (
    CAPTIONS_DIR,
    CaptionError,
    _caption_problems,
    _commentative_posts,
    _dir_bytes,
    _post,
    _posts_frame,
    _preview,
    _read_worklist,
    _write_pool,
    _write_worklist,
    default_standin_dir,
    read_commentative_captions,
)
from .images import MAX_PIXELS, _decoded_candidates, _links_external_bitmap
from .openclipart import DEFAULT_PNG_ROOT, DEFAULT_SVG_ROOT, _Candidate, ensure_openclipart, scan_openclipart
from .selection import _prune_groups, _select_demo
from .text import _prepare_text

logger = logging.getLogger(__name__)


def build_demo_data(
    out_dir: Path | None = None,
    standin_dir: Path | None = None,
    png_root: Path = DEFAULT_PNG_ROOT,
    svg_root: Path = DEFAULT_SVG_ROOT,
    n_demo: int = 1600,
    seed: int = 0,
    install_missing: bool = True,
    *,
    captions_dir: Path | None = None,
    worklist_path: Path | None = None,
    allow_missing_captions: bool = False,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    pin_to_worklist: bool = True,
) -> dict[str, Any]:
    """Build the demo set and the stand-in pool from the openclipart packages.

    Parameters
    ----------
    out_dir
        Demo folder (``images/*.webp`` and ``posts.parquet``); default ``<repo>/data/demo``.
    standin_dir
        Stand-in pool folder (same layout, descriptive captions only); default :func:`default_standin_dir`.
    png_root, svg_root
        openclipart PNG and SVG folders (Debian: ``/usr/share/openclipart/{png,svg}``).
    n_demo
        Number of demo images.
    seed
        Seed of the selection and of the train/test split.
    install_missing
        Install the Debian packages when the default folders are missing (as root only).
    captions_dir
        Folder of the ``commentative_*.csv`` files; default ``ccclip_widgets/demo/captions``.
    worklist_path
        Where to write the caption writers' worklist; default ``<captions_dir>/worklist.csv``.
    allow_missing_captions
        Build even when demo images lack a commentative caption or captions name unknown image ids (those
        rows are skipped and listed in the summary).
    max_pixels
        Images with more pixels are dropped as decompression bombs (Pillow's default limit).
    workers
        Processes decoding the PNGs; default ``min(8, cpu count)``.
    pin_to_worklist
        When the worklist already exists, take the demo images and their splits from it instead of the
        computed selection (which should be identical; ``selection_drift`` in the summary counts the
        differences). False recomputes the selection and overwrites the worklist.

    Returns
    -------
    dict
        Summary: ``source_files``, ``dropped`` (count per reason), ``text_notes`` (description and title
        fixes per reason), ``good_images``, ``near_duplicate_groups``, ``demo_images``, ``demo_train_images``,
        ``demo_test_images``, ``demo_topics``, ``demo_posts``, ``demo_descriptive_posts``,
        ``demo_commentative_posts`` (per language), ``standin_images``, ``missing_captions``,
        ``unknown_caption_ids``, ``invalid_caption_rows``, ``demo_bytes``, ``standin_bytes`` and the paths.

    Raises
    ------
    CaptionError
        When captions are missing, unknown or invalid and ``allow_missing_captions`` is false; the worklist is
        written first, the data folders are left untouched.
    FileNotFoundError
        When the openclipart folders are missing and cannot be installed.
    """
    out_dir = Path(out_dir) if out_dir is not None else repo_data_dir() / "demo"
    standin_dir = Path(standin_dir) if standin_dir is not None else default_standin_dir()
    captions_dir = Path(captions_dir) if captions_dir is not None else CAPTIONS_DIR
    worklist_path = Path(worklist_path) if worklist_path is not None else captions_dir / "worklist.csv"
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    png_root, svg_root = Path(png_root), Path(svg_root)
    ensure_openclipart(png_root, svg_root, install_missing=install_missing)

    records, dropped = scan_openclipart(png_root, svg_root)
    source_files = len(records) + sum(dropped.values())
    notes: Counter[str] = Counter()
    cands = _prepare_text(records, dropped, notes)
    logger.info("%d drawings with usable text; decoding PNGs with %d workers", len(cands), workers)

    linked = [c for c in cands if _links_external_bitmap(c.record.svg_path)]
    dropped["external_bitmap_link"] += len(linked)
    linked_ids = {c.record.image_id for c in linked}
    cands = [c for c in cands if c.record.image_id not in linked_ids]
    images: list[_Candidate] = _decoded_candidates(cands, max_pixels, workers, dropped)

    groups = _prune_groups(images)
    by_id = {c.record.image_id: c for c in images}
    split, standin_ids = _select_demo(groups, n_demo, seed)
    selection = "computed"
    drift = 0
    pinned = _read_worklist(worklist_path) if pin_to_worklist else {}
    if pinned:
        # the committed worklist fixes the demo images (the caption files depend on it), whatever small
        # differences another Pillow or numpy version might make to the near-duplicate grouping
        absent = sorted(set(pinned) - set(by_id))
        if absent:
            raise ValueError(
                f"{worklist_path} names {len(absent)} images that are not available here: {_preview(absent)}; "
                "check the openclipart package version, or rebuild the selection with reselect (CLI: --reselect)"
            )
        drift = len(set(pinned) ^ set(split))
        if drift:
            logger.warning(
                "the computed selection differs from %s in %d images; using the worklist",
                worklist_path,
                drift,
            )
        split, selection = pinned, "worklist"
        demo_groups = {by_id[i].group for i in split}
        standin_ids = sorted(
            c.record.image_id
            for g in groups.values()
            for c in g
            if c.group not in demo_groups and c.record.image_id not in split
        )
    demo = {i: by_id[i] for i in sorted(split)}
    _write_worklist(worklist_path, demo.values(), split)

    captions, invalid = read_commentative_captions(captions_dir)
    captioned = set(captions["image_id"].to_list())
    missing = sorted(set(demo) - captioned)
    unknown = sorted(captioned - set(demo))
    if (missing or unknown or invalid) and not allow_missing_captions:
        raise CaptionError(missing, unknown, invalid)
    if missing or unknown or invalid:
        logger.warning("%s", _caption_problems(missing, unknown, invalid))

    demo_posts = [_post(c, f"{i}-desc-en", c.caption, "en", "descriptive", split[i]) for i, c in demo.items()]
    com_posts = _commentative_posts(captions, demo, split)
    demo_frame = _posts_frame(demo_posts + com_posts)
    standin = [by_id[i] for i in standin_ids]  # the strict filter's leftovers, for the counts below
    _write_pool(out_dir, list(demo.values()), demo_frame)
    from ccclip_widgets.demo.standin import build_standin_pool

    standin_summary = build_standin_pool(
        standin_dir,
        worklist_path=worklist_path,
        png_root=png_root,
        svg_root=svg_root,
        max_pixels=max_pixels,
        workers=workers,
        seed=seed,
        install_missing=False,
    )

    # images that decoded well but are in neither pool are the near-duplicates left out of their groups
    dropped["near_duplicate"] += len(images) - len(demo) - len(standin)
    good = len(demo) + len(standin)
    assert source_files == sum(dropped.values()) + good, "every source file is kept or counted"
    n_test = sum(1 for s in split.values() if s == "test")
    com_by_lang = Counter(p["lang"] for p in com_posts)
    return {
        "source_files": source_files,
        "dropped": dict(sorted(((k, n) for k, n in dropped.items() if n), key=lambda kv: (-kv[1], kv[0]))),
        "dropped_total": sum(dropped.values()),
        "text_notes": dict(sorted(notes.items())),
        "good_images": good,
        "near_duplicate_groups": len(groups),
        "selection": selection,
        "selection_drift": drift,
        "demo_images": len(demo),
        "demo_train_images": len(demo) - n_test,
        "demo_test_images": n_test,
        "demo_topics": dict(sorted(Counter(c.record.topic for c in demo.values()).items())),
        "demo_posts": demo_frame.height,
        "demo_descriptive_posts": len(demo_posts),
        "demo_commentative_posts": dict(sorted(com_by_lang.items())),
        "standin_images": standin_summary["standin_images"],
        "standin_heldout_images": standin_summary["heldout_images"],
        "standin_excluded": standin_summary["excluded"],
        "missing_captions": missing,
        "unknown_caption_ids": unknown,
        "invalid_caption_rows": invalid,
        "demo_bytes": _dir_bytes(out_dir),
        "standin_bytes": _dir_bytes(standin_dir),
        "out_dir": str(out_dir),
        "standin_dir": str(standin_dir),
        "worklist": str(worklist_path),
    }
