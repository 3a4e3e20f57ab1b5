"""Safe image decoding for untrusted social-media images.

Every image in a posts table comes from the outside world, so decoding is guarded:

- a cheap header-only :func:`probe_image` (format, size, mode, frames) for checking whole tables quickly;
- :func:`load_image`, a full decode that refuses decompression bombs before any pixel is decoded (without
  touching PIL's global ``Image.MAX_IMAGE_PIXELS``), refuses truncated files, applies the EXIF orientation,
  takes the first frame of animations, converts every mode to 8-bit RGB correctly, decodes JPEGs at reduced
  size when a target size is known, and letterboxes extreme aspect ratios;
- :func:`make_thumbnail` / :func:`thumbnail_data_uri` for widgets.

Every failure is an :class:`ImageDecodeError` with a machine-friendly ``reason``.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import IO, TypeAlias

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_ASPECT",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "ImageInfo",
    "ImageSource",
    "load_image",
    "make_thumbnail",
    "probe_image",
    "thumbnail_data_uri",
]

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_MAX_ASPECT = 8.0
#: Normalisation of the OpenAI CLIP models (open_clip's default when a model's config names none).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Formats that are ever handed to a PIL decoder. Formats with risky decoders (EPS runs Ghostscript) or that
#: never occur as post images are left out on purpose. Formats whose plugin is not installed (HEIF needs
#: ``pillow-heif``) are skipped silently.
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "WEBP",
    "AVIF",
    "HEIF",
    "BMP",
    "DIB",
    "TIFF",
    "PPM",
    "TGA",
    "ICO",
    "QOI",
)

ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview"

logger = logging.getLogger(__name__)

_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112

# Leading bytes of common image formats; used to tell "corrupt image" from "not an image at all".
_MAGIC_PREFIXES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"qoif",
)

_HINTS = {
    "missing": "check the path and the image root",
    "empty": "the file is empty; re-download or drop this post",
    "too_large_bytes": "pass a larger max_bytes if you trust this file",
    "too_large_pixels": "pass a larger max_pixels if you trust this file (it may be a decompression bomb)",
    "corrupt": "the file is damaged; re-download or drop this post",
    "truncated": "the file ends early (an interrupted download?); re-download or drop this post",
    "unsupported": (
        "not an image in a supported format (" + ", ".join(ALLOWED_FORMATS) + "); convert it to JPEG/PNG/WebP"
    ),
}


def decode_hint(reason: str) -> str:
    """What to do about an :class:`ImageDecodeError` of this ``reason`` (empty when there is no hint)."""
    return _HINTS.get(reason, "")


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says, without decoding pixels.

    Attributes
    ----------
    width, height
        Size in pixels as stored (before EXIF orientation).
    format
        PIL format name, e.g. ``"JPEG"``, ``"PNG"``.
    mode
        PIL mode as stored, e.g. ``"RGB"``, ``"P"``, ``"I;16"``.
    n_frames
        Number of frames (1 for still images).
    """

    width: int
    height: int
    format: str
    mode: str
    n_frames: int


# --------------------------------------------------------------------------------------------------------------
# Opening


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source) if not isinstance(source, str) else source


_allowed_cache: tuple[str, ...] | None = None


def _allowed_formats() -> tuple[str, ...]:
    """Allowed formats that have a registered PIL plugin (computed once)."""
    global _allowed_cache
    if _allowed_cache is None:
        Image.init()
        _allowed_cache = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
    return _allowed_cache


def _open_stream(source: ImageSource, desc: str, max_bytes: int) -> IO[bytes]:
    """Return an open binary stream for ``source`` after the size checks (caller closes it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = len(source)
        if size == 0:
            raise ImageDecodeError(desc, "empty", "zero bytes")
        if size > max_bytes:
            raise ImageDecodeError(desc, "too_large_bytes", f"{size} bytes exceeds max_bytes={max_bytes}")
        return io.BytesIO(bytes(source))
    path = os.fspath(source)
    try:
        fh = open(path, "rb")  # closed by the caller
    except FileNotFoundError:
        raise ImageDecodeError(desc, "missing", "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(desc, "missing", "is a directory, not a file") from None
    except OSError as exc:
        raise ImageDecodeError(desc, "missing", f"cannot open file: {exc.strerror or exc}") from None
    try:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ImageDecodeError(desc, "empty", "zero-byte file")
        if size > max_bytes:
            raise ImageDecodeError(desc, "too_large_bytes", f"{size} bytes exceeds max_bytes={max_bytes}")
    except BaseException:
        fh.close()
        raise
    return fh


_QUIET_OPEN = threading.Lock()


def open_quietly(
    fp: IO[bytes], formats: tuple[str, ...] | list[str] | None = None, *, bomb: str = "raise"
) -> Image.Image:
    """``PIL.Image.open`` that never prints PIL's DecompressionBombWarning.

    Past PIL's global pixel limit (``Image.MAX_IMAGE_PIXELS``, which the toolkit leaves alone) PIL only warns,
    and the warning would be printed raw for an image the toolkit rejects anyway. Here it is raised
    instead (``bomb="raise"``, so the caller turns it into a ``too_large_pixels`` rejection) or dropped
    (``bomb="ignore"``, for callers that check the size themselves). ``catch_warnings`` swaps process-wide
    state, so a lock keeps the toolkit's own threads from racing on it.
    """
    action = "error" if bomb == "raise" else "ignore"
    with _QUIET_OPEN, warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        return Image.open(fp, formats=formats)


def _open_image(stream: IO[bytes], desc: str, max_pixels: int) -> Image.Image:
    """Identify the image and check its declared size; no pixel data is decoded."""
    try:
        im = open_quietly(stream, formats=_allowed_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reachable when max_pixels is above PIL's own limit: raise Image.MAX_IMAGE_PIXELS to go past it.
        raise ImageDecodeError(
            desc,
            "too_large_pixels",
            f"PIL refused the size: {exc} (PIL.Image.MAX_IMAGE_PIXELS sets that limit)",
        ) from None
    except UnidentifiedImageError:
        stream.seek(0)
        head = stream.read(16)
        if any(head.startswith(m) for m in _MAGIC_PREFIXES) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        ):
            raise ImageDecodeError(
                desc, "corrupt", "the header looks like an image but cannot be parsed"
            ) from None
        raise ImageDecodeError(desc, "unsupported", "not a recognized image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError) as exc:
        raise ImageDecodeError(desc, "corrupt", f"cannot read the header: {exc}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        im.close()
        raise ImageDecodeError(desc, "corrupt", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        im.close()
        raise ImageDecodeError(
            desc,
            "too_large_pixels",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
        )
    return im


def _n_frames(im: Image.Image) -> int:
    try:
        return int(getattr(im, "n_frames", 1))
    except Exception:  # counting frames of a damaged animation
        return 1


def probe_image(
    source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> ImageInfo:
    """Check an image from its header only (no pixel decoding).

    Parameters
    ----------
    source
        A path (``str`` or ``os.PathLike``) or the encoded bytes.
    max_pixels
        Refuse images whose declared width * height exceeds this (decompression bombs).
    max_bytes
        Refuse files larger than this.

    Returns
    -------
    ImageInfo
        Declared size, format, mode and frame count.

    Raises
    ------
    ImageDecodeError
        With ``reason`` one of ``missing``, ``empty``, ``too_large_bytes``, ``too_large_pixels``, ``corrupt``,
        ``unsupported``. Truncation is only detected by a full decode (:func:`load_image`).
    """
    desc = _describe(source)
    with _open_stream(source, desc, max_bytes) as stream:
        im = _open_image(stream, desc, max_pixels)
        with im:
            return ImageInfo(
                width=im.size[0],
                height=im.size[1],
                format=str(im.format),
                mode=im.mode,
                n_frames=_n_frames(im),
            )


# --------------------------------------------------------------------------------------------------------------
# Mode conversion


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _array_to_rgb(values: np.ndarray) -> Image.Image:
    """2-D array of 0..255 values -> RGB image."""
    grey = Image.fromarray(np.ascontiguousarray(np.clip(values, 0, 255).astype(np.uint8)))
    return grey.convert("RGB")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 -> 255, 257 * k -> k)."""
    return (values.astype(np.uint32) + 128) // 257


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255 (non-finite values become 0)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo)))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (always returns a new image)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            return _composite_on_white(im)
        return im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(im)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            return _array_to_rgb(_stretch(values))
        return _array_to_rgb(_scale_16bit(values))
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            return _array_to_rgb(np.round(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255.0))
        return _array_to_rgb(_stretch(values))
    if mode in ("1", "L", "CMYK", "YCbCr", "HSV", "RGBX"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(
            "<image>", "unsupported", f"cannot convert mode {mode!r} to RGB: {exc}"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Geometry


def _fit(im: Image.Image, *, target_size: int | None, max_aspect: float, max_pixels: int) -> Image.Image:
    """Downscale (shorter side <= 2 * target_size) and letterbox extreme aspect ratios onto white."""

    def canvas_short_side(w: int, h: int) -> int:
        long_side, short_side = max(w, h), min(w, h)
        if max_aspect > 0 and long_side > max_aspect * short_side:
            return max(short_side, math.ceil(long_side / max_aspect - 1e-9))
        return short_side

    w, h = im.size
    letterbox = canvas_short_side(w, h) != min(w, h)
    canvas_short = canvas_short_side(w, h)
    scale = 1.0
    if target_size is not None and canvas_short > 2 * target_size:
        scale = 2 * target_size / canvas_short
    canvas_pixels = max(w, h) * canvas_short * scale * scale
    if canvas_pixels > max_pixels:  # a 64000x1 strip must not become a 64000x8000 canvas
        scale *= 0.99 * math.sqrt(max_pixels / canvas_pixels)  # margin for rounding up
    if scale < 1.0:
        new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        w, h = im.size
    if not letterbox:
        return im
    short = canvas_short_side(w, h)
    canvas_size = (w, short) if w >= h else (short, h)
    canvas = Image.new("RGB", canvas_size, _WHITE)
    canvas.paste(im, ((canvas_size[0] - w) // 2, (canvas_size[1] - h) // 2))
    return canvas


# --------------------------------------------------------------------------------------------------------------
# Full decode

_truncation_warned = False


def _warn_if_truncation_hidden() -> None:
    """Truncated files only raise while PIL's global LOAD_TRUNCATED_IMAGES is False; say so once if not."""
    global _truncation_warned
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _truncation_warned:
        _truncation_warned = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code): truncated images will load "
            "with grey areas instead of raising ImageDecodeError"
        )


def load_image(
    source: ImageSource,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode an untrusted image safely into a fully loaded 8-bit RGB image.

    Parameters
    ----------
    source
        A path (``str`` or ``os.PathLike``) or the encoded bytes.
    target_size
        The size the caller will resize to (e.g. a CLIP model's 224). When given, JPEGs are decoded at reduced
        size (DCT scaling; the shorter side never goes below ``target_size``) and the result is downscaled so
        its shorter side is at most ``2 * target_size``. ``None`` keeps the full resolution.
    max_pixels
        Refuse images whose declared width * height exceeds this, checked from the header before any decoding.
    max_bytes
        Refuse files larger than this.
    max_aspect
        Images whose long/short side ratio exceeds this are letterboxed (padded with white, centered) to
        exactly this ratio, so a later resize plus center crop stays small and shows the content.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully loaded, not tied to any open file. EXIF orientation is applied; animations give
        their first frame; transparency is composited on white; 16-bit and float images are scaled (not
        clipped) to 0..255.

    Raises
    ------
    ImageDecodeError
        With ``reason`` one of ``missing``, ``empty``, ``too_large_bytes``, ``too_large_pixels``, ``corrupt``,
        ``truncated``, ``unsupported``.
    """
    if target_size is not None and target_size < 1:
        raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
    desc = _describe(source)
    _warn_if_truncation_hidden()
    with _open_stream(source, desc, max_bytes) as stream:
        im = _open_image(stream, desc, max_pixels)
        with im:
            if target_size is not None and im.format in ("JPEG", "MPO"):
                im.draft("RGB", (target_size, target_size))
            try:
                im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageDecodeError(desc, "too_large_pixels", f"PIL refused the size: {exc}") from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as exc:
                text = str(exc)
                reason = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "corrupt"
                raise ImageDecodeError(desc, reason, f"cannot decode the pixels: {text}") from None
            frame: Image.Image = im
            try:
                if im.getexif().get(_ORIENTATION_TAG, 1) not in (1, None):
                    frame = ImageOps.exif_transpose(im) or im  # a new image, detached from the file
            except Exception:  # broken EXIF must not lose an otherwise good image
                frame = im
            try:
                rgb = frame if frame is not im and frame.mode == "RGB" else _to_rgb(frame)
            except ImageDecodeError as exc:
                raise ImageDecodeError(desc, exc.reason, exc.detail) from None
    return _fit(rgb, target_size=target_size, max_aspect=max_aspect, max_pixels=max_pixels)


# --------------------------------------------------------------------------------------------------------------
# Thumbnails

_MIME = {
    "WEBP": "image/webp",
    "JPEG": "image/jpeg",
    "JPG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
}


def make_thumbnail(source: ImageSource, size: int = 128, format: str = "WEBP", quality: int = 80) -> bytes:
    """Encode a small thumbnail that fits in a ``size`` x ``size`` box (aspect ratio kept).

    Parameters
    ----------
    source
        A path or the encoded bytes; decoded with :func:`load_image` (all its safety checks apply).
    size
        Longest side of the thumbnail in pixels.
    format
        Output format: ``"WEBP"`` (default), ``"JPEG"`` or ``"PNG"``.
    quality
        Encoder quality for lossy formats.

    Returns
    -------
    bytes
        The encoded thumbnail.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    fmt = format.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in _MIME:
        raise ValueError(f"unsupported thumbnail format {format!r}; use one of WEBP, JPEG, PNG, GIF")
    im = load_image(source, target_size=size)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    options: dict[str, object] = {"quality": quality} if fmt in ("WEBP", "JPEG") else {}
    im.save(out, format=fmt, **options)
    return out.getvalue()


def thumbnail_data_uri(source: ImageSource, size: int = 128, format: str = "WEBP", quality: int = 80) -> str:
    """Return a thumbnail as a ``data:`` URI (``"data:image/webp;base64,..."``) for HTML widgets.

    Parameters
    ----------
    source, size, format, quality
        As for :func:`make_thumbnail`.

    Returns
    -------
    str
        The data URI.
    """
    data = make_thumbnail(source, size=size, format=format, quality=quality)
    mime = _MIME[format.upper()]
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
