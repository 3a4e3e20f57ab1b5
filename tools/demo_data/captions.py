"""Captions and splits on disk: commentative caption files, the caption writers' worklist, posts tables.

Reads ``ccclip_widgets/demo/captions/commentative_*.csv`` (:func:`read_commentative_captions`), reads and
writes the worklist that pins the demo images and their train/test splits, and writes a pool folder
(``images/*.webp`` and ``posts.parquet``) atomically.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

import ccclip_widgets.demo
from ccclip_widgets._io import atomic_write_bytes, atomic_write_text, default_cache_dir
from ccclip_widgets.errors import InputDataError

from .openclipart import _Candidate
from .text import _squash

CAPTIONS_DIR = Path(ccclip_widgets.demo.__file__).resolve().parent / "captions"  # shipped with the package
LICENSE = "public domain (openclipart)"
CAPTION_LANGS = ("en", "uk", "es", "de")
POST_COLUMNS = (
    "post_id",
    "image",
    "text",
    "lang",
    "caption_kind",
    "split",
    "image_id",
    "title",
    "keywords",
    "source",
    "license",
)
WORKLIST_COLUMNS = ("image_id", "split", "title", "description", "keywords", "descriptive_caption")


class CaptionError(InputDataError):
    """Raised when the commentative caption files do not match the demo selection.

    Attributes
    ----------
    missing
        Demo image ids without any commentative caption.
    unknown
        Image ids named in a caption file that are not demo images.
    invalid
        ``"file:line: reason"`` for rows that could not be read (bad language, empty text, bad header).
    """

    def __init__(self, missing: Sequence[str], unknown: Sequence[str], invalid: Sequence[str]) -> None:
        self.missing = list(missing)
        self.unknown = list(unknown)
        self.invalid = list(invalid)
        hint = "pass allow_missing_captions=True (CLI: --allow-missing-captions) to build anyway"
        super().__init__(f"{_caption_problems(self.missing, self.unknown, self.invalid)}; {hint}")


def _caption_problems(missing: Sequence[str], unknown: Sequence[str], invalid: Sequence[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} demo images have no commentative caption: {_preview(missing)}")
    if unknown:
        parts.append(f"{len(unknown)} captions name unknown image ids (skipped): {_preview(unknown)}")
    if invalid:
        parts.append(f"{len(invalid)} caption rows are invalid (skipped): {_preview(invalid)}")
    return "; ".join(parts)


def _preview(items: Sequence[str], n: int = 20) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


# -- captions -------------------------------------------------------------------------------------------------
def read_commentative_captions(captions_dir: Path = CAPTIONS_DIR) -> tuple[pl.DataFrame, list[str]]:
    """Read every ``commentative_*.csv`` file of a folder.

    Parameters
    ----------
    captions_dir
        Folder of the caption files (columns ``image_id``, ``lang``, ``text``; UTF-8).

    Returns
    -------
    captions : polars.DataFrame
        Columns ``image_id``, ``lang``, ``text``, ``file``, ``line`` in file and line order; exact duplicate
        (image_id, lang, text) rows are kept once.
    invalid : list of str
        ``"file:line: reason"`` for rows that were skipped.
    """
    rows: list[dict[str, Any]] = []
    invalid: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for path in sorted(Path(captions_dir).glob("commentative_*.csv")):
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            if not {"image_id", "lang", "text"} <= set(header):
                invalid.append(f"{path.name}:1: header must have image_id, lang, text (has {header})")
                continue
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "") for k, v in row.items()}
                image_id, lang, text = (
                    row["image_id"].strip(),
                    row["lang"].strip().lower(),
                    _squash(row["text"]),
                )
                if lang not in CAPTION_LANGS:
                    invalid.append(f"{path.name}:{line}: language {lang!r} not in {', '.join(CAPTION_LANGS)}")
                elif not image_id or not text:
                    invalid.append(f"{path.name}:{line}: empty image_id or text")
                elif (image_id, lang, text) not in seen:
                    seen.add((image_id, lang, text))
                    rows.append(
                        {"image_id": image_id, "lang": lang, "text": text, "file": path.name, "line": line}
                    )
    schema = {
        "image_id": pl.String,
        "lang": pl.String,
        "text": pl.String,
        "file": pl.String,
        "line": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema), invalid


def _commentative_posts(
    captions: pl.DataFrame, demo: dict[str, _Candidate], split: dict[str, str]
) -> list[dict]:
    posts: list[dict[str, Any]] = []
    counter: Counter[tuple[str, str]] = Counter()
    for row in captions.iter_rows(named=True):
        c = demo.get(row["image_id"])
        if c is None:
            continue
        key = (row["image_id"], row["lang"])
        counter[key] += 1
        suffix = "" if counter[key] == 1 else f"-{counter[key]}"
        posts.append(
            _post(
                c,
                f"{row['image_id']}-com-{row['lang']}{suffix}",
                row["text"],
                row["lang"],
                "commentative",
                split[row["image_id"]],
            )
        )
    return posts


def _post(c: _Candidate, post_id: str, text: str, lang: str, kind: str, split: str) -> dict[str, Any]:
    return {
        "post_id": post_id,
        "image": f"images/{c.record.image_id}.webp",
        "text": text,
        "lang": lang,
        "caption_kind": kind,
        "split": split,
        "image_id": c.record.image_id,
        "title": c.title,
        "keywords": ", ".join(c.keywords),
        "source": c.record.source,
        "license": LICENSE,
    }


# -- writing --------------------------------------------------------------------------------------------------
def _posts_frame(posts: list[dict[str, Any]]) -> pl.DataFrame:
    schema = dict.fromkeys(POST_COLUMNS, pl.String)
    df = pl.DataFrame(posts, schema=schema)
    return df.sort(["image_id", "caption_kind", "lang", "post_id"])


def _write_pool(folder: Path, cands: Sequence[_Candidate], posts: pl.DataFrame) -> int:
    """Replace ``folder/images`` and ``folder/posts.parquet`` atomically; return the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    tmp = folder / f".images.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    total = 0
    try:
        for c in cands:
            (tmp / f"{c.record.image_id}.webp").write_bytes(c.thumb)
            total += len(c.thumb)
        old = None
        if images.exists():
            old = folder / f".images.{uuid.uuid4().hex[:8]}.old"
            os.replace(images, old)
        os.replace(tmp, images)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    buf = io.BytesIO()
    posts.write_parquet(buf, compression="zstd", statistics=False)
    _readable(atomic_write_bytes(folder / "posts.parquet", buf.getvalue()))
    return total + buf.tell()


def _readable(path: Path) -> None:
    """Give an atomically written file (created 0600 by ``mkstemp``) the usual 0644 permissions."""
    os.chmod(path, 0o644)


def _read_worklist(path: Path) -> dict[str, str]:
    """Return ``{image_id: split}`` from an existing worklist, or {} when there is none."""
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {r["image_id"].strip(): r["split"].strip() for r in rows if r.get("image_id", "").strip()}
    bad = sorted(i for i, sp in out.items() if sp not in ("train", "test"))
    if bad:
        raise ValueError(f"{path}: split must be train or test (rows {_preview(bad)})")
    return out


def _write_worklist(path: Path, cands: Iterable[_Candidate], split: dict[str, str]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(WORKLIST_COLUMNS)
    for c in sorted(cands, key=lambda c: c.record.image_id):
        writer.writerow(
            [
                c.record.image_id,
                split[c.record.image_id],
                c.title,
                c.description,
                ", ".join(c.keywords),
                c.caption,
            ]
        )
    _readable(atomic_write_text(path, buf.getvalue()))


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def default_standin_dir() -> Path:
    """Return the stand-in pool folder, ``<cache>/standin`` (``~/.cache/ccclip_widgets/standin`` by default).

    Returns
    -------
    Path
        The folder (not created).
    """
    return default_cache_dir() / "standin"
