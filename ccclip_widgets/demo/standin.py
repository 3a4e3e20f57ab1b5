"""The stand-in pool: openclipart images the demo model's image tower learns from (descriptive captions only).

The demo model stands in for stock CLIP, which learned from descriptive text. Its image tower is trained
here on every usable openclipart drawing that is neither a demo image nor reserved for independent evaluation,
with a gentler text filter than the demo set's (icon-theme drawings keep a title taken from their file name):
about five times the images the strict filter leaves.

Exclusions, checked by ``tests/test_demo_manifests.py``:

- every image of a near-duplicate group (same normalised title or near-identical pixels) that holds a demo
  *test* image or a demo *validation* image (:func:`demo_validation_ids`: about a fifth of the demo's train
  images, on which fine-tuning recipes are chosen). The other demo train images may be seen with their
  descriptive captions, as stock CLIP has seen much of the web; their commentative captions are what
  fine-tuning adds;
- every image listed in ``data/reserved_images.txt`` (paths relative to the openclipart ``png/`` folder) and
  every image of a near-duplicate group or normalised title that holds one.

About 15% of the groups with no demo image are held out (``split == "test"``) to measure the stand-in on descriptive
captions it never saw.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .._io import repo_data_dir
from .data.captions import _post, _posts_frame, _read_worklist, _write_pool, default_standin_dir
from .data.images import MAX_PIXELS, _decoded_candidates, _links_external_bitmap
from .data.openclipart import (
    DEFAULT_PNG_ROOT,
    DEFAULT_SVG_ROOT,
    _Candidate,
    ensure_openclipart,
    scan_openclipart,
)
from .data.selection import _keep_distinct, _near_duplicate_groups, _order_key
from .data.text import _prepare_text, _title_key

log = logging.getLogger(__name__)

__all__ = [
    "HOLDOUT_PERMILLE",
    "MAX_STANDIN_PER_GROUP",
    "VALIDATION_PERCENT",
    "build_standin_pool",
    "demo_validation_ids",
    "read_reserved_images",
    "write_standin_manifest",
]

#: At most this many visibly different images of one near-duplicate group (1,375 "gramastar" stars would
#: otherwise crowd out everything else).
MAX_STANDIN_PER_GROUP = 4
#: Share of near-duplicate groups held out for evaluation, in thousandths.
HOLDOUT_PERMILLE = 150
#: Share of the demo's train images (by normalised title, so look-alikes stay together) set aside to choose the
#: fine-tuning recipe on (see :func:`demo_validation_ids`).
VALIDATION_PERCENT = 20


def demo_validation_ids(worklist: dict[str, str], titles: dict[str, str]) -> set[str]:
    """The demo train images set aside for choosing the fine-tuning recipe.

    They are carved from the train split by a hash of the normalised title, so drawings with the same title stay
    on one side. The stand-in never sees them, so recipes are compared on images as unseen as the test ones;
    the final demo run then fine-tunes on the whole train split and is scored on the test split only.

    Parameters
    ----------
    worklist
        ``{image_id: split}`` of the demo selection.
    titles
        ``{image_id: title}`` of the demo images.

    Returns
    -------
    set of str
    """
    out = set()
    for image_id, split in worklist.items():
        if split != "train":
            continue
        key = _title_key(titles.get(image_id, "")) or image_id
        if int(_order_key(0, "demo-validation", key)[:8], 16) % 100 < VALIDATION_PERCENT:
            out.add(image_id)
    return out


def reserved_images_path() -> Path:
    """The committed list of reserved openclipart images (``data/reserved_images.txt``)."""
    return Path(os.environ.get("CCCLIP_RESERVED_IMAGES", repo_data_dir() / "reserved_images.txt"))


def read_reserved_images(path: str | os.PathLike[str] | None = None) -> set[str]:
    """Read the reserved-image list: PNG paths relative to openclipart's ``png/`` folder, without ``.png``.

    Parameters
    ----------
    path
        The list (default :func:`reserved_images_path`); ``#`` starts a comment.

    Returns
    -------
    set of str
        Relative paths without extension, as :attr:`ClipartRecord.rel` spells them.

    Raises
    ------
    FileNotFoundError
        When the list is missing: training without it could use images kept for independent evaluation.
    """
    p = Path(path) if path is not None else reserved_images_path()
    if not p.is_file():
        raise FileNotFoundError(
            f"The reserved-image list {p} is missing; it names openclipart images that must never be trained "
            "on. Restore data/reserved_images.txt or point CCCLIP_RESERVED_IMAGES at it."
        )
    out = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(line[:-4] if line.lower().endswith(".png") else line)
    return out


def write_standin_manifest(standin_dir: Path, out: Path) -> int:
    """Write the pool's training manifest (``image_id``, ``source``, ``title``, ``split``: train or heldout).

    It is committed next to the demo weights, so what the stand-in learned from can be checked without
    rebuilding the pool (``tests/test_demo_manifests.py``).

    Returns
    -------
    int
        Rows written.
    """
    import polars as pl

    from .._io import atomic_write_bytes

    posts = pl.read_parquet(Path(standin_dir) / "posts.parquet")
    frame = (
        posts.select(
            "image_id",
            "source",
            "title",
            pl.when(pl.col("split") == "test")
            .then(pl.lit("heldout"))
            .otherwise(pl.lit("train"))
            .alias("split"),
        )
        .unique("image_id")
        .sort("image_id")
    )
    import io

    buf = io.BytesIO()
    frame.write_csv(buf)
    atomic_write_bytes(Path(out), buf.getvalue())
    return frame.height


def build_standin_pool(
    standin_dir: Path | None = None,
    *,
    worklist_path: Path | None = None,
    reserved_path: Path | None = None,
    png_root: Path = DEFAULT_PNG_ROOT,
    svg_root: Path = DEFAULT_SVG_ROOT,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    seed: int = 0,
    install_missing: bool = True,
    exclude_validation: bool = True,
) -> dict[str, Any]:
    """Write the stand-in pool (``images/*.webp`` + ``posts.parquet``, descriptive English captions).

    Parameters
    ----------
    standin_dir
        Output folder (default :func:`default_standin_dir`).
    worklist_path
        The demo selection (``ccclip_widgets/demo/captions/worklist.csv``); its images and their
        near-duplicate groups are excluded.
    reserved_path
        Reserved-image list (default ``data/reserved_images.txt``).
    png_root, svg_root
        openclipart folders.
    max_pixels
        Decompression-bomb limit.
    workers
        Decoding processes (default ``min(8, cpu count)``).
    seed
        Seed of the held-out choice.
    install_missing
        Install the Debian packages when missing (root only).
    exclude_validation
        Leave out the demo validation images (:func:`demo_validation_ids`) and their look-alikes, so recipes
        are compared on images the stand-in never saw. False reproduces the pool of the shipped weights, which
        were trained before the validation split existed (see ``data/models/README.md``).

    Returns
    -------
    dict
        Counts: ``standin_images``, ``heldout_images``, ``excluded`` (per reason), ``dropped`` (per reason).
    """
    from .data.captions import CAPTIONS_DIR

    standin_dir = Path(standin_dir) if standin_dir is not None else default_standin_dir()
    worklist = _read_worklist(Path(worklist_path) if worklist_path else CAPTIONS_DIR / "worklist.csv")
    if not worklist:
        raise FileNotFoundError(
            "the demo worklist is missing: the stand-in pool must exclude the demo images"
        )
    reserved = read_reserved_images(reserved_path)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    ensure_openclipart(Path(png_root), Path(svg_root), install_missing=install_missing)
    records, dropped = scan_openclipart(Path(png_root), Path(svg_root))
    notes: Counter[str] = Counter()
    reserved_titles = set()
    cands = _prepare_text(records, dropped, notes, broad=True)
    for c in cands:
        if c.record.rel in reserved:
            reserved_titles.add(_title_key(c.title))
    linked = {c.record.image_id for c in cands if _links_external_bitmap(c.record.svg_path)}
    dropped["external_bitmap_link"] += len(linked)
    cands = [c for c in cands if c.record.image_id not in linked]
    log.info("stand-in pool: decoding %d PNGs with %d workers", len(cands), workers)
    images: list[_Candidate] = _decoded_candidates(cands, max_pixels, workers, dropped)
    titles = {c.record.image_id: c.title for c in images}
    validation = demo_validation_ids(worklist, titles) if exclude_validation else set()
    roots = _near_duplicate_groups(images)
    members: dict[int, list[_Candidate]] = defaultdict(list)
    for c, root in zip(images, roots, strict=True):
        members[root].append(c)
    excluded: Counter[str] = Counter()
    kept: list[tuple[str, _Candidate]] = []
    for ms in members.values():
        ids = {c.record.image_id for c in ms}
        if any(worklist.get(i) == "test" or i in validation for i in ids):
            excluded["demo_test_or_validation_group"] += len(ms)
            continue
        if any(c.record.rel in reserved or _title_key(c.title) in reserved_titles for c in ms):
            excluded["reserved_group"] += len(ms)
            continue
        # demo train images first (the stand-in sees them with their descriptive captions), then the best titled
        chosen = _keep_distinct(ms, MAX_STANDIN_PER_GROUP, first=lambda c: c.record.image_id not in worklist)
        excluded["near_duplicate_over_cap"] += len(ms) - len(chosen)
        gid = min(ids)
        in_demo = any(i in worklist for i in ids)
        held = not in_demo and int(_order_key(seed, "standin-holdout", gid)[:8], 16) % 1000 < HOLDOUT_PERMILLE
        kept.extend(("test" if held else "train", c) for c in chosen)
    kept.sort(key=lambda sc: sc[1].record.image_id)
    posts = _posts_frame(
        [_post(c, f"{c.record.image_id}-desc-en", c.caption, "en", "descriptive", split) for split, c in kept]
    )
    _write_pool(standin_dir, [c for _, c in kept], posts)
    n_held = sum(1 for s, _ in kept if s == "test")
    return {
        "standin_images": len(kept),
        "train_images": len(kept) - n_held,
        "heldout_images": n_held,
        "excluded": dict(excluded),
        "dropped": dict(dropped),
        "reserved_listed": len(reserved),
        "demo_validation_images": len(validation),
        "standin_dir": str(standin_dir),
    }
