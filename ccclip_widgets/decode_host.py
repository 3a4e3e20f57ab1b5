"""Host side of the batched JPEG pipeline (:mod:`ccclip_widgets.gpu_decode`): read, screen, pack.

:func:`screen_jpeg` decides from a file's header (with :func:`exif_orientation`) whether its bytes can go to the
device decoder; :class:`JpegBytesDataset` runs in DataLoader workers, reads each source's bytes, passes plain
JPEGs on raw and decodes everything else with PIL and the model's ``preprocess``; :func:`collate_encoded` packs a
batch's JPEG streams into one ``uint8`` buffer (an :class:`EncodedBatch`). Nothing here touches the GPU.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    load_image,
    open_quietly,
    probe_image,
)

__all__ = [
    "DEFAULT_MAX_DECODE_PIXELS",
    "EncodedBatch",
    "JpegBytesDataset",
    "collate_encoded",
    "exif_orientation",
    "screen_jpeg",
]

#: JPEGs with more pixels than this are decoded by PIL in the workers (with DCT-domain downscaling) instead of
#: at full size on the device: a batch of 24-megapixel photos would need gigabytes of decode buffers.
DEFAULT_MAX_DECODE_PIXELS = 4096 * 4096

_ORIENTATION_TAG = 0x0112
_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
_EOI_WINDOW = 4096  # the end-of-image marker must lie in the last bytes (trailing padding is tolerated)
_EXIF_WINDOW = 1 << 17  # EXIF sits in an APP1 segment (at most 64 KiB) near the start of the file


# --------------------------------------------------------------------------------------------- header screening
def exif_orientation(data: bytes | bytearray | memoryview) -> int:
    """EXIF orientation (1-8) of an encoded image, from its header only; 1 when absent or unreadable.

    Parameters
    ----------
    data
        The encoded image.

    Returns
    -------
    int
        1 (upright) to 8, as in the EXIF standard; values outside that range count as 1, as in
        ``PIL.ImageOps.exif_transpose``.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    if buf.find(b"Exif\x00\x00", 0, _EXIF_WINDOW) < 0:  # cheap: most social-media JPEGs carry no EXIF
        return 1

    try:
        with open_quietly(io.BytesIO(buf), bomb="ignore") as im:  # the size is screened elsewhere
            value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def screen_jpeg(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
) -> int | None:
    """Decide from the header whether ``data`` can go to the batched JPEG decoder.

    Parameters
    ----------
    data
        The encoded image.
    max_pixels, max_bytes
        Limits of :func:`~ccclip_widgets.images.probe_image` (decompression bombs, huge files).
    max_aspect
        Images more elongated than this are letterboxed by :func:`~ccclip_widgets.images.load_image`; they go to
        PIL so both paths give the same result.
    max_decode_pixels
        Larger JPEGs go to PIL, which decodes them at reduced size.

    Returns
    -------
    int or None
        The EXIF orientation (1-8) when the stream is a single-frame RGB or greyscale JPEG within all limits and
        ends with an end-of-image marker; ``None`` when it must be decoded (or rejected) by
        :func:`~ccclip_widgets.images.load_image` instead.
    """
    if not data.startswith(_SOI):
        return None
    try:
        info = probe_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
    except Exception:  # load_image repeats the check and reports the reason
        return None
    if info.format != "JPEG" or info.mode not in ("RGB", "L") or info.n_frames != 1:
        return None  # CMYK/YCCK (Adobe inversion), MPO, ... are PIL's job
    long_side, short_side = max(info.width, info.height), min(info.width, info.height)
    if max_aspect > 0 and long_side > max_aspect * short_side:
        return None
    if info.width * info.height > max_decode_pixels:
        return None
    if data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) < 0:
        return None  # truncated (an interrupted download): PIL reports it as such
    return exif_orientation(data)


# --------------------------------------------------------------------------------------------- worker side
def _read_source(source: Any, max_bytes: int) -> bytes | None:
    """The encoded bytes of a path or bytes source; None when unreadable (load_image then says why)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(os.fspath(source), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0 or size > max_bytes:
                return None
            return fh.read()
    except (OSError, TypeError, ValueError):
        return None


def _error_text(exc: BaseException) -> str:
    """Failure text in the format of ``embed._ImageDataset``: ``"<reason>: <message>"``."""
    if isinstance(exc, ImageDecodeError):
        return f"{exc.reason}: {exc}"
    return f"corrupt_image: {type(exc).__name__}: {exc}"


#: One dataset item: (index, JPEG bytes or None, orientation, ready pixels or None, error text or "").
Item = tuple[int, "bytes | None", int, "torch.Tensor | None", str]


class JpegBytesDataset(Dataset):
    """Reads encoded images in DataLoader workers; decodes only what the batched JPEG decoder cannot take.

    Parameters
    ----------
    sources
        Paths or encoded bytes, one per image.
    preprocess
        The model's evaluation transform (PIL image -> ``3 x S x S`` tensor), used for the PIL fallback.
    image_size
        The model's input size ``S`` (JPEGs decoded by PIL are decoded at reduced size for it).
    max_pixels, max_bytes, max_aspect
        Safety limits, as in :func:`~ccclip_widgets.images.load_image`.
    max_decode_pixels
        Larger JPEGs are decoded by PIL in the worker.

    Notes
    -----
    ``__getitem__`` never raises: a source that fails is returned with its error text
    (``"<reason>: <message>"``, the reason being an :class:`~ccclip_widgets.images.ImageDecodeError` reason).
    """

    def __init__(
        self,
        sources: Sequence[Any],
        preprocess: Callable[[Any], torch.Tensor],
        image_size: int,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_aspect: float = DEFAULT_MAX_ASPECT,
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    ) -> None:
        self.sources = sources
        self.preprocess = preprocess
        self.image_size = int(image_size)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.max_aspect = max_aspect
        self.max_decode_pixels = max_decode_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Item:
        source = self.sources[i]
        data = _read_source(source, self.max_bytes)
        if data is not None:
            orientation = screen_jpeg(
                data,
                max_pixels=self.max_pixels,
                max_bytes=self.max_bytes,
                max_aspect=self.max_aspect,
                max_decode_pixels=self.max_decode_pixels,
            )
            if orientation is not None:
                return i, data, orientation, None, ""
        try:
            img = load_image(
                source,
                target_size=self.image_size,
                max_pixels=self.max_pixels,
                max_bytes=self.max_bytes,
                max_aspect=self.max_aspect,
            )
            return i, None, 1, self.preprocess(img), ""
        except Exception as exc:
            return i, None, 1, None, _error_text(exc)


@dataclass
class EncodedBatch:
    """A batch from :class:`JpegBytesDataset` after :func:`collate_encoded`.

    Attributes
    ----------
    index
        ``(N,)`` positions of the batch's images in the dataset.
    data
        All JPEG streams of the batch back to back (``uint8``).
    offsets
        ``(G + 1,)`` start of each stream in ``data``, then the total length.
    jpeg_rows
        ``(G,)`` rows of the batch (``0..N-1``) whose image is a stream in ``data``.
    orientations
        ``(G,)`` EXIF orientation of each stream.
    ready_rows
        ``(M,)`` rows decoded and preprocessed on the CPU by the fallback.
    ready
        ``(M, 3, S, S)`` their pixels (``float32``), or an empty tensor.
    errors
        ``N`` strings: ``""`` or ``"<reason>: <message>"``.
    """

    index: torch.Tensor
    data: torch.Tensor
    offsets: torch.Tensor
    jpeg_rows: torch.Tensor
    orientations: torch.Tensor
    ready_rows: torch.Tensor
    ready: torch.Tensor
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def byte_tensors(self) -> list[torch.Tensor]:
        """The JPEG streams as a list of 1-D ``uint8`` CPU tensors (views into :attr:`data`)."""
        if self.offsets.numel() <= 1:
            return []
        sizes = torch.diff(self.offsets).tolist()
        return list(torch.split(self.data, sizes))


def collate_encoded(items: Sequence[Item]) -> EncodedBatch:
    """Collate :class:`JpegBytesDataset` items, keeping the JPEG streams raw (packed into one buffer).

    Parameters
    ----------
    items
        Items of :class:`JpegBytesDataset`.

    Returns
    -------
    EncodedBatch
    """
    index = torch.tensor([it[0] for it in items], dtype=torch.long)
    jpeg_rows = [r for r, it in enumerate(items) if it[1] is not None]
    payloads: list[bytes] = [items[r][1] for r in jpeg_rows]  # type: ignore[misc]
    sizes = [len(p) for p in payloads]
    offsets = np.zeros(len(payloads) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    data = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    flat = data.numpy()
    for p, start, size in zip(payloads, offsets[:-1].tolist(), sizes):
        flat[start : start + size] = np.frombuffer(p, dtype=np.uint8)
    ready_rows = [r for r, it in enumerate(items) if it[3] is not None]
    ready = torch.stack([items[r][3] for r in ready_rows]) if ready_rows else torch.empty(0)  # type: ignore[misc]
    return EncodedBatch(
        index=index,
        data=data,
        offsets=torch.from_numpy(offsets),
        jpeg_rows=torch.tensor(jpeg_rows, dtype=torch.long),
        orientations=torch.tensor([items[r][2] for r in jpeg_rows], dtype=torch.long),
        ready_rows=torch.tensor(ready_rows, dtype=torch.long),
        ready=ready,
        errors=[it[4] for it in items],
    )
