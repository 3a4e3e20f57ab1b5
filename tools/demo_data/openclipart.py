"""Debian's openclipart packages: finding (or installing) them and reading every drawing's SVG metadata.

:func:`scan_openclipart` lists the drawings as :class:`ClipartRecord` (files plus raw Dublin Core title,
description, keywords and creator); the rest of the build carries each one through its filters as a
``_Candidate``, defined here beside the record it wraps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
DEFAULT_PNG_ROOT = OPENCLIPART_ROOT / "png"
DEFAULT_SVG_ROOT = OPENCLIPART_ROOT / "svg"


@dataclass(frozen=True)
class ClipartRecord:
    """One openclipart drawing: its files and the metadata read from the SVG.

    Attributes
    ----------
    image_id
        Stable id, ``"oc-"`` plus 10 hex digits of SHA-1 of the SVG path relative to its root.
    rel
        Path relative to the package roots without extension (``"animals/birds/puffin-md"``).
    svg_path, png_path
        The two files (``png_path`` may not exist).
    title, description
        Raw Dublin Core title and description ("" when absent).
    keywords
        Raw ``dc:subject`` keywords in file order.
    creator
        ``dc:creator`` name ("" when absent).
    """

    image_id: str
    rel: str
    svg_path: Path
    png_path: Path
    title: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    creator: str = ""

    @property
    def topic(self) -> str:
        """The package's top-level folder (``"animals"``, ``"food"`` ...), used as the topic stratum."""
        return self.rel.split("/", 1)[0] if "/" in self.rel else "unsorted"

    @property
    def source(self) -> str:
        """The PNG path relative to the openclipart root (``"png/animals/frog.png"``)."""
        return f"png/{self.rel}.png"


@dataclass
class _Candidate:
    """A record while it goes through the filters (internal)."""

    record: ClipartRecord
    title: str = ""
    title_origin: str = "metadata"
    description: str = ""
    keywords: tuple[str, ...] = ()
    caption: str = ""
    width: int = 0
    height: int = 0
    thumb: bytes = b""
    dhash: int = 0
    gray: bytes = b""
    pixel_hash: str = ""
    group: str = ""
    notes: list[str] = field(default_factory=list)


def ensure_openclipart(
    png_root: Path = DEFAULT_PNG_ROOT, svg_root: Path = DEFAULT_SVG_ROOT, install_missing: bool = True
) -> None:
    """Make sure the openclipart PNG and SVG folders exist, installing the Debian packages if allowed.

    Parameters
    ----------
    png_root, svg_root
        Folders of the rendered PNGs and of the SVGs.
    install_missing
        Run ``apt-get install -y openclipart-png openclipart-svg`` when a default folder is missing and the
        process runs as root.

    Raises
    ------
    FileNotFoundError
        When a folder is still missing, with the command that would install it.
    """
    png_root, svg_root = Path(png_root), Path(svg_root)
    packages = {png_root: "openclipart-png", svg_root: "openclipart-svg"}
    missing = [p for p in (png_root, svg_root) if not p.is_dir()]
    installable = [
        packages[p]
        for p in missing
        if p.resolve() in (DEFAULT_PNG_ROOT.resolve(), DEFAULT_SVG_ROOT.resolve())
    ]
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if installable and install_missing and is_root and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *installable]
        logger.info("installing %s", " ".join(installable))
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, check=False)
            subprocess.run(cmd, env=env, check=False)
    still = [p for p in (png_root, svg_root) if not p.is_dir()]
    if still:
        hint = "sudo apt-get install -y openclipart-png openclipart-svg"
        raise FileNotFoundError(
            f"openclipart folders not found: {', '.join(map(str, still))}. Install the Debian packages with "
            f"`{hint}` or pass png_root/svg_root (CLI: --png-root/--svg-root) pointing at copies."
        )


def read_svg_metadata(path: Path) -> dict[str, Any]:
    """Read the Dublin Core block of an openclipart SVG.

    Only the file's ``<metadata>`` element is parsed (parsing stops there), so large drawings are cheap.

    Parameters
    ----------
    path
        The SVG file.

    Returns
    -------
    dict
        ``title``, ``description``, ``creator`` (str, "" when absent) and ``keywords`` (tuple of str).

    Raises
    ------
    ValueError
        When the file is not well-formed XML before its metadata ends.
    """
    meta: ET.Element | None = None
    try:
        for _, elem in ET.iterparse(path, events=("end",)):
            if _local(elem.tag) == "metadata":
                meta = elem
                break
    except ET.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    out: dict[str, Any] = {"title": "", "description": "", "creator": "", "keywords": ()}
    if meta is None:
        return out
    work = next((e for e in meta.iter() if _local(e.tag) == "Work"), None)
    if work is None:
        return out
    for child in work:
        name = _local(child.tag)
        if name in ("title", "description"):
            out[name] = _text(child)
        elif name == "creator":
            out["creator"] = " ".join(
                _text(e) for e in child.iter() if _local(e.tag) == "title" and _text(e)
            ) or _text(child)
        elif name == "subject":
            items = [_text(e) for e in child.iter() if _local(e.tag) == "li"]
            if not items and _text(child):
                items = re.split(r"[,;]", _text(child))
            out["keywords"] = tuple(k.strip() for k in items if k and k.strip())
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1]


def _text(elem: ET.Element) -> str:
    return "".join(elem.itertext()).strip() if len(elem) else (elem.text or "").strip()


def scan_openclipart(
    png_root: Path = DEFAULT_PNG_ROOT, svg_root: Path = DEFAULT_SVG_ROOT
) -> tuple[list[ClipartRecord], Counter[str]]:
    """List the drawings of the openclipart folders with their SVG metadata.

    Drawings are keyed by their SVG path, in sorted order; a drawing whose SVG or PNG resolves (through
    symbolic links) to a file an earlier drawing already uses is the same drawing filed twice and is left out
    (counted as ``symlink_duplicate``).

    Parameters
    ----------
    png_root, svg_root
        Folders of the rendered PNGs and of the SVGs (same relative layout).

    Returns
    -------
    records : list of ClipartRecord
        Sorted by relative path.
    dropped : collections.Counter
        Files left out, by reason (``symlink_duplicate``, ``metadata_unreadable``, ``missing_png``).
    """
    png_root, svg_root = Path(png_root), Path(svg_root)
    dropped: Counter[str] = Counter()
    records: list[ClipartRecord] = []
    ids: dict[str, str] = {}
    seen_files: set[str] = set()
    for svg in sorted(svg_root.rglob("*.svg")):
        rel = svg.relative_to(svg_root).with_suffix("").as_posix()
        png = png_root / f"{rel}.png"
        if not png.is_file():
            dropped["missing_png"] += 1
            continue
        real = {os.path.realpath(svg), os.path.realpath(png)}
        if real & seen_files:
            dropped["symlink_duplicate"] += 1
            continue
        seen_files |= real
        try:
            meta = read_svg_metadata(svg)
        except (ValueError, OSError) as exc:
            logger.debug("unreadable metadata: %s", exc)
            dropped["metadata_unreadable"] += 1
            continue
        image_id = "oc-" + hashlib.sha1(rel.encode("utf-8")).hexdigest()[:10]
        if image_id in ids:  # pragma: no cover - 40 bits; would need ~10^6 files to be likely
            raise RuntimeError(f"image id collision: {rel} and {ids[image_id]}")
        ids[image_id] = rel
        records.append(ClipartRecord(image_id=image_id, rel=rel, svg_path=svg, png_path=png, **meta))
    return records, dropped
