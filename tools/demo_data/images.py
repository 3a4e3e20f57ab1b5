"""Images: decoding each PNG safely into a cropped WebP thumbnail and the fingerprints that find duplicates.

:func:`_analyze_all` runs :func:`_analyze_png` in worker processes (which import it by name: it must stay a
module-level function), returning a thumbnail, an exact pixel hash, a difference hash and 16 x 16 grey levels
per image, or the reason the image is unusable.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

THUMB_SIZE = 160
WEBP_QUALITY = 80
#: Pillow's default ``Image.MAX_IMAGE_PIXELS``, fixed here so that the selection does not depend on a global.
MAX_PIXELS = 89_478_485


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


def _decoded_candidates(cands: Sequence[Any], max_pixels: int, workers: int, dropped: Counter) -> list[Any]:
    """Decode the candidates' PNGs; keep those that decode and are not pixel-identical to an earlier one.

    Each dropped candidate counts under its reason in ``dropped`` (``exact_duplicate`` for repeated pixels); the
    kept ones come back with their size, thumbnail and fingerprints filled in.
    """
    results = _analyze_all([str(c.record.png_path) for c in cands], max_pixels, workers)
    kept: list[Any] = []
    seen: set[str] = set()
    for c, res in zip(cands, results, strict=True):
        if res["reason"]:
            dropped[res["reason"]] += 1
        elif res["pixel_hash"] in seen:
            dropped["exact_duplicate"] += 1
        else:
            seen.add(res["pixel_hash"])
            kept.append(
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
    return kept
