"""Build the offline demo data set from Debian's openclipart packages (a build tool: not shipped in the wheel).

Run it as ``ccclip demo build-data`` (or ``python tools/build_demo_data.py``, the same flags) from a source
checkout; ``ccclip_widgets.demo.data`` loads this file there, and says what is missing in an installed package.

The demo needs image + text pairs that ship with the repository and need no network: public-domain clip art
from the Debian packages ``openclipart-png`` (rendered PNGs) and ``openclipart-svg`` (the same drawings as SVG,
whose embedded RDF/Dublin Core block holds the title, description and keywords).

:func:`build_demo_data` reads both, drops junk for a counted reason, writes one descriptive English caption per
image, and splits the good images into two disjoint pools:

* the **demo** set (``data/demo``): ``n_demo`` images stratified over the package's topic folders, with a fixed
  train/test split by near-duplicate group, one descriptive post per image plus the commentative posts that the
  committed caption files ``ccclip_widgets/demo/captions/commentative_*.csv`` provide;
* the **stand-in** pool (a cache folder): every other good image with its descriptive caption only, used to
  train the small stand-in CLIP.

Nothing is dropped silently: the returned summary counts every reason. The selection depends only on the
package contents, ``n_demo`` and ``seed`` (all orderings use SHA-256 of stable keys, never a random number
generator), so a rebuild gives the same image ids; the caption files depend on that. Once written, the
caption writers' worklist (``captions/worklist.csv``) pins the demo images and their splits, so that even a
library version that nudged the near-duplicate grouping cannot move them (``selection_drift`` reports it).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import logging
import math
import os
import re
import shutil
import subprocess
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

import ccclip_widgets.demo
from ccclip_widgets._io import atomic_write_bytes, atomic_write_text, default_cache_dir, repo_data_dir
from ccclip_widgets.errors import InputDataError

__all__ = [
    "CAPTION_LANGS",
    "DEFAULT_PNG_ROOT",
    "DEFAULT_SVG_ROOT",
    "LICENSE",
    "POST_COLUMNS",
    "CaptionError",
    "ClipartRecord",
    "build_demo_data",
    "default_standin_dir",
    "descriptive_caption",
    "ensure_openclipart",
    "read_commentative_captions",
    "read_svg_metadata",
    "scan_openclipart",
]

logger = logging.getLogger(__name__)

OPENCLIPART_ROOT = Path("/usr/share/openclipart")
DEFAULT_PNG_ROOT = OPENCLIPART_ROOT / "png"
DEFAULT_SVG_ROOT = OPENCLIPART_ROOT / "svg"
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

THUMB_SIZE = 160
WEBP_QUALITY = 80
#: Pillow's default ``Image.MAX_IMAGE_PIXELS``, fixed here so that the selection does not depend on a global.
MAX_PIXELS = 89_478_485
#: Near-duplicate groups keep at most this many images.
MAX_PER_GROUP = 2
#: Two images are near-duplicates when their 64-bit difference hashes differ in at most this many bits and
#: their 16 x 16 grey thumbnails differ by at most ``GRAY_NEAR`` grey levels on average.
DHASH_NEAR = 4
GRAY_NEAR = 4.0
#: A second image of a group is kept only if it differs from the first by more than these amounts.
DHASH_DISTINCT = 10
GRAY_DISTINCT = 10.0
TEST_FRACTION = 0.25
#: At most this share of a topic's images goes to the demo, so that the stand-in pool sees every topic.
DEMO_TOPIC_CAP = 0.7

# -- text patterns --------------------------------------------------------------------------------------------
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL_RE = re.compile(r"(?:https?://|ftp://|www\.)\S+|\b[\w.-]+\.(?:com|org|net|edu|gov)(?:/\S*)?\b", re.I)
_HASH_RE = re.compile(r"\bhash\s*\(\s*0x[0-9a-f]+\s*\)|\bhash\b", re.I)
_CONVERSION_RE = re.compile(
    r"\b(?:eps|ai|wmf|emf|pdf|bitmap|png)\s+converted\b|\bconverted\s+(?:from|to|with|by|in|using)\b", re.I
)
_MARKUP_RE = re.compile(r"<[^>]*>|&[a-z]+;|<!--")
_CREDIT_RE = re.compile(
    r"^(?:created|made|drawn|designed|done|create)\s+(?:with|by|in|using)\b|\binkscape\b|^data from\b"
    r"|^contact\b|\bcopyright\b|\bpublic domain\b|\blicen[cs]e\b|\bcreative commons\b|\be-?mail\b"
    r"|\bsubmission\b",
    re.I,
)
_COLLECTION_NOTE_RE = re.compile(
    r"\bpart of\b.*\b(?:collection|set|series)\b|\bcollection of\b|\bclip\s?art collection\b", re.I
)
#: Titles that name a whole icon theme or collection: the files carry no title of their own; dropped.
_THEME_TITLE_RE = re.compile(
    r"\bicon\s+(?:collection|theme|set)\b|\bicon-?theme\b|\biconset\b|\bicons$|[\s-]theme$|\bsvg theme\b"
    r"|\bgradient collection\b",
    re.I,
)
#: Other collection titles: the file name usually names the drawing, so the title is taken from it.
_GENERIC_TITLE_RE = re.compile(
    r"\bcollection\b|\bclip\s?arts?\b|\bs[iu]bmission\b|\bsymbol[\s_]signs\b|^svg\b|\bopen\s?clip\s?art\b"
    r"|^(?:untitled|image|drawing|picture|new document|layer|figure|unnamed|no title)\s*\d*$|^various\b",
    re.I,
)
_GROUP_PREFIX_RE = re.compile(r"^clip\s?art\s+by\s+[^-]+?\s+-\s+(?P<name>.+)$", re.I)
_GROUP_SUFFIX_RE = re.compile(
    r"^(?P<name>.+?)\s+-\s+[^-]*\b(?:elements|collection|set|series|clip\s?art)$", re.I
)
_EXT_RE = re.compile(r"\.(?:svg|svgz|png|jpe?g|ai|eps|wmf|pdf|xcf)\b", re.I)
_BW_RE = re.compile(r"\(\s*b\s*(?:and|&)\s*w\s*\)|\bb\s*&\s*w\b|\bb and w\b", re.I)
_OPENCLIPART_RE = re.compile(r"\bopen\s?clip\s?art(?:\.org)?\b", re.I)
_COLOUR_NOTE_RE = re.compile(r"\(\s*colou?r(?:ed)?\s*\)", re.I)
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")
_TRAILING_NUMBER_RE = re.compile(r"(?<=[A-Za-z])[_#-]?\d+[a-z]?$|\s+#?0\d+[a-z]?$|\s*#\d+$")
_WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")

_META_KEYWORDS = frozenset(
    """hash unsorted openclipart clipart clip art icon icons theme themes lemon theme icon magick mapsym
    appicon webpage svg inkscape image images drawing clip art library buttons menu special misc various
    other stuff new""".split()
) | {"lemon_theme_icon", "clip art", "open clip art", "lemon theme icon", "open clip art library"}
_STOPWORDS = frozenset(
    """a an the of and or in on at to for with from by is are was this that it its as be into over under
    his her their your my our some very one two""".split()
)
#: Words that distinguish colour, orientation or style variants; dropped from the near-duplicate title key.
_VARIANT_WORDS = frozenset(
    """red green blue yellow orange purple violet pink brown black white grey gray gold golden silver
    cyan magenta turquoise seagreen navy beige dark light bright pale colour color colours colors coloured
    colored bw and w outline outlined simple simplified alt alternate alternative version ver v small large
    big mini left right up down top bottom front back side rosso verde blu giallo nero bianco rouge vert bleu
    jaune noir blanc rot grun gruen blau gelb schwarz weiss new old shiny glossy flat plain filled empty""".split()
)
_FILENAME_JUNK_TOKENS = frozenset("aiga bb gnome stock fs mime md xp svg png ico tango".split())


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


# -- package discovery ----------------------------------------------------------------------------------------
def default_standin_dir() -> Path:
    """Return the stand-in pool folder, ``<cache>/standin`` (``~/.cache/ccclip_widgets/standin`` by default).

    Returns
    -------
    Path
        The folder (not created).
    """
    return default_cache_dir() / "standin"


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


# -- text cleaning --------------------------------------------------------------------------------------------
def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _dedupe_words(text: str) -> str:
    """Drop a word that repeats the word before it ("the the", "moulure moulures")."""
    out: list[str] = []
    for word in text.split(" "):
        prev = out[-1].lower() if out else ""
        low = word.lower().rstrip(",;:.")
        if prev and prev[-1:].isalnum() and (low == prev or low == prev + "s" or prev == low + "s"):
            continue
        out.append(word)
    return " ".join(out)


def _tidy_title(raw: str) -> str:
    """Turn a title or a file name into plain words ("cake1" -> "cake", "StopSign" -> "Stop Sign")."""
    text = _EMAIL_RE.sub(" ", raw)
    text = _URL_RE.sub(" ", text)
    text = _EXT_RE.sub(" ", text)
    text = text.replace("_", " ")
    text = _OPENCLIPART_RE.sub(" ", text)
    text = _BW_RE.sub(" in black and white ", text)
    text = _COLOUR_NOTE_RE.sub(" ", text)
    if " " not in text.strip():
        text = text.replace("-", " ")
        text = _CAMEL_RE.sub(" ", text)
    text = re.sub(r"\(\s*\)", " ", text)
    text = _squash(text)
    prev = None
    while prev != text:
        prev = text
        text = _TRAILING_NUMBER_RE.sub("", text).strip(" -_#,.;:")
    text = re.sub(r"\s+([,;:)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    if len(text) > 5 and text.isupper():
        text = text.title()
    return _dedupe_words(_squash(text))


def _meaningful(title: str) -> bool:
    return any(len(w) >= 3 for w in _WORD_RE.findall(title))


def _filename_title(rec: ClipartRecord) -> str:
    """Derive a title from the file name, without the author's name and numbering."""
    stem = rec.rel.rsplit("/", 1)[-1]
    stem = re.sub(r"[_\s]+(?:\d+[a-z]?)?_*$", "", stem)
    slug = re.sub(r"[^a-z0-9]+", "_", rec.creator.lower()).strip("_")
    low = stem.lower().strip("_")
    if slug and len(low) >= 3 and slug.startswith(low):
        return ""  # the file is named after its author only
    for cut in range(len(slug), 2, -1):  # author names are truncated in the file names
        suffix = "_" + slug[:cut].rstrip("_")
        if low.endswith(suffix) and len(low) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    tokens = [t for t in re.split(r"[_\-\s.]+", _CAMEL_RE.sub("_", stem)) if t]
    # "bar1" -> "bar", "home06a" -> "home"; tokens that still hold digits ("70a006") are numbering
    tokens = [re.sub(r"(?<=[^\W\d_])\d+[a-z]?$", "", t) for t in tokens]
    tokens = [t for t in tokens if not any(c.isdigit() for c in t)]
    while tokens and tokens[0].lower() in _FILENAME_JUNK_TOKENS:
        tokens = tokens[1:]
    while tokens and tokens[-1].lower() in _FILENAME_JUNK_TOKENS:
        tokens = tokens[:-1]
    return _tidy_title(" ".join(t for t in tokens if len(t) > 1))


def _clean_keywords(rec: ClipartRecord) -> tuple[str, ...]:
    creator = _squash(re.sub(r"\(.*?\)|\[.*?\]", " ", rec.creator)).lower()
    out: list[str] = []
    for raw in rec.keywords:
        kw = _HASH_RE.sub(" ", raw)
        kw = _EMAIL_RE.sub(" ", kw)
        kw = _squash(kw.replace("_", " ").replace("-", " ")).lower().strip(" .,;:")
        kw = _squash(_OPENCLIPART_RE.sub(" ", re.sub(r"\b0x[0-9a-f]+\b", " ", kw)))
        too_long = len(kw) > 30 or (" " not in kw and len(kw) > 18)
        if not kw or kw in _META_KEYWORDS or too_long or not _meaningful(kw):
            continue
        if creator and (kw == creator or kw in creator.split()):
            continue
        if kw not in out:
            out.append(kw)
    return tuple(out)


def _folder_keywords(rec: ClipartRecord) -> tuple[str, ...]:
    """Topic words from the package's folders ("food/fruit/pear" -> "food", "fruit")."""
    out: list[str] = []
    for part in rec.rel.split("/")[:-1]:
        kw = _squash(re.sub(r"[_-]+", " ", part)).lower()
        if kw and kw not in _META_KEYWORDS and kw not in out and _meaningful(kw) and not kw.endswith("theme"):
            out.append(kw)
    return tuple(out)


def _clean_description(raw: str, title: str, notes: Counter[str]) -> str:
    """Return a short clean description, or "" (the reason is counted in ``notes``)."""
    text = _squash(raw)
    if not text:
        return ""
    if _EMAIL_RE.search(text):
        notes["description_email"] += 1
        return ""
    if _CONVERSION_RE.search(text):
        notes["description_conversion_note"] += 1
        return ""
    if _MARKUP_RE.search(text) or _HASH_RE.search(text):
        notes["description_markup_or_hash"] += 1
        return ""
    if _CREDIT_RE.search(text) or _COLLECTION_NOTE_RE.search(text):
        notes["description_credit_or_collection_note"] += 1
        return ""
    stripped = _squash(_URL_RE.sub(" ", text))
    if stripped != text:
        notes["description_url_removed"] += 1
        text = stripped
    text = _BW_RE.sub(" in black and white ", text)
    text = re.sub(r"[,;:.]?\s*enjoy(?:\s+it)?\s*[!.]*\s*$", "", text, flags=re.I)
    text = re.split(r"(?<=[a-z)])\s*[.!?](?:\s|$)", text, maxsplit=1)[0]  # first sentence
    text = re.sub(r"^(?:this is|here is|it is|this image is)\s+", "", text, flags=re.I)
    text = re.sub(r"\.{2,}.*$", "", text).strip(" .,;:!-")
    if len(text.split(" ")) > 25:
        notes["description_too_long"] += 1
        return ""
    title_words = {w.lower() for w in _WORD_RE.findall(title)} | _STOPWORDS
    desc_words = {w.lower() for w in _WORD_RE.findall(text) if len(w) > 1}
    if not desc_words or desc_words <= title_words or not _meaningful(text):
        notes["description_redundant"] += 1
        return ""
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and not (len(first) > 1 and first.isupper()):
        text = text[0].lower() + text[1:]
    return _dedupe_words(_squash(text))


def descriptive_caption(title: str, description: str, keywords: Sequence[str], icon: bool = False) -> str:
    """Compose the descriptive English caption of one image.

    Parameters
    ----------
    title
        The cleaned title.
    description
        A cleaned description, or "".
    keywords
        Keywords to mention, most useful first; the first eight not already in the text are used.
    icon
        Say "An icon of" instead of "A clip art image of".

    Returns
    -------
    str
        For example ``"A clip art image of Saturn: the planet Saturn; keywords: astronomy, planet, space."``
    """
    prefix = "An icon of" if icon and not re.search(r"\bicons?\b", title, re.I) else "A clip art image of"
    text = f"{prefix} {title}"
    if description:
        text += f": {description}"
    seen = {w.lower() for w in _WORD_RE.findall(f"{title} {description}")}
    kws: list[str] = []
    for kw in keywords:
        words = {w.lower() for w in _WORD_RE.findall(kw)} - _STOPWORDS
        if words and words <= seen | {w + "s" for w in seen} | {w[:-1] for w in seen if w.endswith("s")}:
            continue
        kws.append(kw)
        seen |= words
        if len(kws) == 8:
            break
    if kws:
        text += "; keywords: " + ", ".join(kws)
    text = _dedupe_words(_squash(text)).rstrip(" .,;:") + "."
    return text


def _title_key(title: str) -> str:
    words = []
    for w in _WORD_RE.findall(title.lower()):
        if w in _VARIANT_WORDS or w in _STOPWORDS or len(w) < 2:
            continue
        words.append(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return " ".join(words)


# -- images ---------------------------------------------------------------------------------------------------
def _analyze_png(path: str, max_pixels: int) -> dict[str, Any]:
    """Decode one PNG safely; return its thumbnail and fingerprints, or the reason it is unusable.

    The thumbnail is cropped to the drawing (many files are a small drawing on a large empty page), composited
    on white and scaled so that its longest side is ``THUMB_SIZE``.
    """
    out: dict[str, Any] = {"reason": None, "width": 0, "height": 0}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                out.update(width=width, height=height)
                if width * height > max_pixels:
                    return {**out, "reason": "decompression_bomb"}
                im.load()
                rgba = im.convert("RGBA")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return {**out, "reason": "decompression_bomb"}
    except (OSError, ValueError, SyntaxError):
        return {**out, "reason": "unreadable_image"}
    # find the drawing on a small probe, then crop the full-size image around it
    scale = min(1.0, 512 / max(width, height))
    probe = (
        rgba
        if scale == 1.0
        else rgba.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    )
    ink = np.asarray(_on_white(probe).convert("L")) < 240
    if ink.sum() < max(4, 0.0005 * ink.size):
        return {**out, "reason": "blank_image"}
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    x0, x1 = cols[0] / scale, (cols[-1] + 1) / scale
    y0, y1 = rows[0] / scale, (rows[-1] + 1) / scale
    if max(x1 - x0, y1 - y0) < 24:
        return {**out, "reason": "too_small"}
    margin = 0.04 * max(x1 - x0, y1 - y0) + 1
    box = (
        max(0, math.floor(x0 - margin)),
        max(0, math.floor(y0 - margin)),
        min(width, math.ceil(x1 + margin)),
        min(height, math.ceil(y1 + margin)),
    )
    cw, ch = box[2] - box[0], box[3] - box[1]
    if max(cw, ch) > 5 * min(cw, ch):
        return {**out, "reason": "extreme_aspect_ratio"}
    factor = THUMB_SIZE / max(cw, ch)
    size = (max(1, round(cw * factor)), max(1, round(ch * factor)))
    rgb = _on_white(rgba.crop(box).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
    if float(np.asarray(rgb, dtype=np.float32).reshape(-1, 3).std(axis=0).max()) < 4.0:
        return {**out, "reason": "near_uniform_image"}
    buf = io.BytesIO()
    rgb.save(buf, format="WEBP", quality=WEBP_QUALITY, method=4)
    out["thumb"] = buf.getvalue()
    out["pixel_hash"] = hashlib.sha1(rgb.tobytes()).hexdigest()
    out["dhash"] = _dhash(rgb)
    out["gray"] = _gray16(rgb)
    return out


_EXTERNAL_IMAGE_RE = re.compile(rb"<(?:svg:)?image\b[^>]*?href\s*=\s*[\"'](?!data:)", re.I)


def _links_external_bitmap(svg: Path) -> bool:
    """Whether the SVG embeds a bitmap by reference to another file; its PNG rendering may show a placeholder."""
    try:
        return _EXTERNAL_IMAGE_RE.search(svg.read_bytes()) is not None
    except OSError:
        return False


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray16(img: Image.Image) -> bytes:
    """The image centred on a white square, as 16 x 16 grey levels (for near-duplicate checks)."""
    side = max(img.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return square.convert("L").resize((16, 16), Image.Resampling.BOX).tobytes()


def _dhash(img: Image.Image) -> int:
    """64-bit difference hash of the grey image (9 x 8, horizontal gradients)."""
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _analyze_all(paths: Sequence[str], max_pixels: int, workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(paths) < 64:
        return [_analyze_png(p, max_pixels) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_analyze_png, paths, [max_pixels] * len(paths), chunksize=16))


# -- grouping and selection -----------------------------------------------------------------------------------
class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def _near_duplicate_groups(cands: list[_Candidate]) -> list[int]:
    """Union images with the same title key or a near-identical difference hash; return a root per image."""
    n = len(cands)
    uf = _UnionFind(n)
    first_by_key: dict[str, int] = {}
    for i, c in enumerate(cands):
        key = _title_key(c.title)
        if key:
            if key in first_by_key:
                uf.union(first_by_key[key], i)
            else:
                first_by_key[key] = i
    hashes = np.array([c.dhash for c in cands], dtype=np.uint64)
    grays = _gray_matrix(cands)
    for i in range(n - 1):
        close = np.nonzero(_popcount64(hashes[i + 1 :] ^ hashes[i]) <= DHASH_NEAR)[0] + i + 1
        if close.size:
            mad = np.abs(grays[close] - grays[i]).mean(axis=1)
            for j in close[mad <= GRAY_NEAR]:
                uf.union(i, int(j))
    return [uf.find(i) for i in range(n)]


def _gray_matrix(cands: Sequence[_Candidate]) -> np.ndarray:
    if not cands:
        return np.zeros((0, 256), dtype=np.float32)
    return np.stack([np.frombuffer(c.gray, dtype=np.uint8) for c in cands]).astype(np.float32)


def _distinct(a: _Candidate, b: _Candidate) -> bool:
    """Whether two images of one group look different enough to keep both."""
    bits = bin(a.dhash ^ b.dhash).count("1")
    mad = float(np.abs(_gray_matrix([a])[0] - _gray_matrix([b])[0]).mean())
    return bits > DHASH_DISTINCT or mad > GRAY_DISTINCT


def _order_key(seed: int, *parts: str) -> str:
    return hashlib.sha256(":".join((str(seed), *parts)).encode("utf-8")).hexdigest()


def _quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over topics in proportion to the square root of their size, capped per topic."""
    caps = {t: max(1, math.floor(DEMO_TOPIC_CAP * n)) for t, n in sizes.items() if n > 0}
    total = min(total, sum(caps.values()))
    quota = dict.fromkeys(caps, 0)
    open_topics = set(caps)
    left = total
    while left > 0 and open_topics:
        weights = {t: math.sqrt(sizes[t]) for t in open_topics}
        wsum = sum(weights.values())
        shares = {t: left * w / wsum for t, w in weights.items()}
        floors = {t: min(math.floor(s), caps[t] - quota[t]) for t, s in shares.items()}
        given = sum(floors.values())
        if given == 0:  # hand out the remainders one by one, largest share first
            for t in sorted(open_topics, key=lambda t: (-(shares[t] % 1), t)):
                if left == 0:
                    break
                if quota[t] < caps[t]:
                    quota[t] += 1
                    left -= 1
        else:
            for t, k in floors.items():
                quota[t] += k
            left -= given
        open_topics = {t for t in open_topics if quota[t] < caps[t]}
    return quota


def _select_demo(
    groups: dict[str, list[_Candidate]], n_demo: int, seed: int
) -> tuple[dict[str, str], list[str]]:
    """Choose demo groups stratified by topic and split them; return ``{image_id: split}`` and stand-in ids."""
    by_topic: dict[str, list[str]] = defaultdict(list)
    for gid, members in groups.items():
        by_topic[members[0].record.topic].append(gid)
    sizes = {t: sum(len(groups[g]) for g in gids) for t, gids in by_topic.items()}
    quota = _quotas(sizes, n_demo)
    demo: dict[str, str] = {}
    chosen: set[str] = set()
    for topic in sorted(by_topic):
        gids = sorted(by_topic[topic], key=lambda g: _order_key(seed, "demo", g))
        picked: list[str] = []
        count = 0
        for gid in gids:
            if count >= quota.get(topic, 0):
                break
            if count + len(groups[gid]) > quota[topic]:
                continue
            picked.append(gid)
            count += len(groups[gid])
        n_test = round(TEST_FRACTION * count)
        test_count = 0
        for gid in sorted(picked, key=lambda g: _order_key(seed, "split", g)):
            split = "test" if test_count < n_test and test_count + len(groups[gid]) <= n_test + 1 else "train"
            if split == "test":
                test_count += len(groups[gid])
            for c in groups[gid]:
                demo[c.record.image_id] = split
        chosen.update(picked)
    standin = sorted(c.record.image_id for g, m in groups.items() if g not in chosen for c in m)
    return demo, standin


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


def _keep_distinct(members: list[_Candidate], cap: int, first: Any = None) -> list[_Candidate]:
    """Sort a near-duplicate group best first (``first`` ranks ahead of that: a key function returning False for
    the preferred members), then keep up to ``cap`` images that look different from every image kept before."""
    members.sort(
        key=lambda c: (
            bool(first(c)) if first is not None else False,
            c.title_origin != "metadata",
            not c.description,
            -len(c.keywords),
            c.record.image_id,
        )
    )
    kept = [members[0]]
    for c in members[1:]:
        if len(kept) >= cap:
            break
        if all(_distinct(c, k) for k in kept):
            kept.append(c)
    return kept


def _prune_groups(images: list[_Candidate]) -> dict[str, list[_Candidate]]:
    """Group near-duplicates and keep at most ``MAX_PER_GROUP`` visibly different images of each group.

    Every image gets its group id (the smallest image id of the group) in ``group``; the returned mapping
    holds only the kept images, best first (a title of their own, a description, more keywords).
    """
    roots = _near_duplicate_groups(images)
    members: dict[int, list[_Candidate]] = defaultdict(list)
    for c, root in zip(images, roots, strict=True):
        members[root].append(c)
    groups: dict[str, list[_Candidate]] = {}
    for ms in members.values():
        kept = _keep_distinct(ms, MAX_PER_GROUP)
        gid = min(c.record.image_id for c in ms)
        for c in ms:
            c.group = gid
        groups[gid] = kept
    return groups


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


# -- the pipeline ---------------------------------------------------------------------------------------------
def _prepare_text(
    records: list[ClipartRecord], dropped: Counter[str], notes: Counter[str], *, broad: bool = False
) -> list[_Candidate]:
    """Clean titles, descriptions and keywords; drop records whose text is junk.

    ``broad`` (used for the stand-in pool) keeps icon-theme drawings under a title taken from their file name
    and drawings whose title no second author uses: more images with plainer captions.
    """
    cands: list[_Candidate] = []
    keyword_df: Counter[str] = Counter()
    creators_of: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        keyword_df.update({w.lower() for kw in _clean_keywords(rec) for w in _WORD_RE.findall(kw)})
        who = rec.creator.lower() or f"anonymous:{rec.rel}"
        for w in _WORD_RE.findall(
            f"{rec.title} {rec.description} {' '.join(rec.keywords)}".replace("_", " ")
        ):
            creators_of[w.lower()].add(who)
    # words that several authors use: mostly English, since the few non-English titles come from single authors
    lexicon = {w for w, who in creators_of.items() if len(who) >= 2 and len(w) >= 3}
    title_count = Counter(_squash(rec.title).lower() for rec in records)
    description_count = Counter(_squash(rec.description).lower() for rec in records)
    for rec in records:
        raw = _squash(rec.title)
        if _EMAIL_RE.search(raw):
            dropped["email_in_title"] += 1
            continue
        if _CONVERSION_RE.search(raw):
            dropped["conversion_note_in_title"] += 1
            continue
        spaced = _squash(raw.replace("_", " "))
        if _THEME_TITLE_RE.search(spaced):
            named = _filename_title(rec) if broad else ""
            if not _meaningful(named):
                dropped["generic_collection_title"] += 1
                continue
            spaced = raw = named
        keywords = _clean_keywords(rec)
        origin = "metadata"
        m = _GROUP_PREFIX_RE.match(spaced) or _GROUP_SUFFIX_RE.match(spaced)
        if m and _GROUP_PREFIX_RE.match(spaced) and title_count[raw.lower()] >= 3:
            # "Clipart by <author> - <drawing>" shared by several files: a collection whose files name
            # different drawings; its keywords describe the collection, so keep only those the folders confirm
            named = _filename_title(rec)
            raw, origin = (
                (named, "file_name") if _meaningful(named) else (m.group("name"), "collection_title")
            )
            folders = _folder_keywords(rec)
            context = {w.lower() for w in _WORD_RE.findall(f"{named} {' '.join(folders)}")}
            keywords = folders + tuple(
                k for k in keywords if k not in folders and set(_WORD_RE.findall(k)) <= context
            )
        elif m:
            raw, origin = m.group("name"), "collection_title"
        elif _GENERIC_TITLE_RE.search(spaced) or (rec.creator and raw.lower() == rec.creator.lower()):
            raw, origin = "", "generic_title"
        title = _tidy_title(raw)
        if not _meaningful(title):
            title = _filename_title(rec)
            origin = "file_name" if origin == "metadata" else f"{origin}+file_name"
        if not _meaningful(title) and keywords:
            title = keywords[0]
            origin += "+keyword"
        if not _meaningful(title):
            dropped["generic_collection_title" if "generic" in origin else "empty_title"] += 1
            continue
        if origin != "metadata":
            notes[f"title_from_{origin.split('+')[-1]}"] += 1
        if rec.description.strip() and description_count[_squash(rec.description).lower()] >= 5:
            notes["description_shared_by_collection"] += 1  # a note about a whole set, not this drawing
            description = ""
        else:
            description = _clean_description(rec.description, title, notes)
        title_known = any(w.lower() in lexicon for w in _WORD_RE.findall(title))
        if not title_known and not keywords and not description and not broad:
            dropped["uninformative_text"] += 1
            continue
        if not keywords:
            keywords = _folder_keywords(rec)
        kws = tuple(sorted(keywords, key=lambda k: (-keyword_df[k.split(" ")[0]], k)))
        icon = "/icons/" in f"/{rec.rel}/" or rec.topic == "buttons"
        cand = _Candidate(record=rec, title=title, title_origin=origin, description=description, keywords=kws)
        cand.caption = descriptive_caption(title, description, kws, icon=icon)
        cands.append(cand)
    return cands


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
    results = _analyze_all([str(c.record.png_path) for c in cands], max_pixels, workers)
    images: list[_Candidate] = []
    seen_pixels: set[str] = set()
    for c, res in zip(cands, results, strict=True):
        if res["reason"]:
            dropped[res["reason"]] += 1
            continue
        if res["pixel_hash"] in seen_pixels:
            dropped["exact_duplicate"] += 1
            continue
        seen_pixels.add(res["pixel_hash"])
        images.append(
            replace(
                c,
                width=res["width"],
                height=res["height"],
                thumb=res["thumb"],
                dhash=res["dhash"],
                gray=res["gray"],
                pixel_hash=res["pixel_hash"],
            )
        )

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


if __name__ == "__main__":
    import sys

    from ccclip_widgets.cli import main

    sys.exit(main(["demo", "build-data", *sys.argv[1:]]))
