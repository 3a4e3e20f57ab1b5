"""Device side of the batched JPEG pipeline (:mod:`ccclip_widgets.gpu_decode`): decode and preprocess.

What the device decoder can do here (:func:`gpu_decode_available`, :func:`use_device_decode`, whether it applies
EXIF orientation itself), open_clip's evaluation transform as numbers and :func:`orient`, and
:func:`decode_and_preprocess`: a list of JPEG streams decoded in one ``torchvision.io.decode_jpeg`` call (nvJPEG
on CUDA, libjpeg-turbo on a CPU), one by one when the batch fails, with PIL for what the decoder refuses, then
resized, cropped or padded and normalised on the device.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .decode_host import _ORIENTATION_TAG, _error_text, screen_jpeg
from .images import OPENAI_MEAN, OPENAI_STD, load_image

log = logging.getLogger(__name__)

__all__ = [
    "decode_and_preprocess",
    "gpu_decode_available",
    "orient",
    "use_device_decode",
]

_FLOAT_CHUNK = 1 << 26  # at most this many float elements are resized at once (256 MiB)

_deprecation_filter_installed = False


def _torchvision_io() -> Any:
    """Import ``torchvision.io`` (which registers the image ops) and silence its per-call deprecation notice."""
    global _deprecation_filter_installed
    import torchvision.io

    if not _deprecation_filter_installed:
        # torchvision >= 0.29 warns on every decode call that its codecs move to TorchCodec; the API still works.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")
        _deprecation_filter_installed = True
    return torchvision.io


# --------------------------------------------------------------------------------------------- capability checks
def _tiny_jpeg(width: int = 16, height: int = 8, orientation: int = 1) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 2, height // 2))
    buf = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[_ORIENTATION_TAG] = orientation
        img.save(buf, "JPEG", quality=95, exif=exif)
    else:
        img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _as_uint8_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@functools.cache
def _probe_device_decode(device: str) -> bool:
    try:
        tvio = _torchvision_io()
        out = tvio.decode_jpeg([_as_uint8_tensor(_tiny_jpeg())], mode=tvio.ImageReadMode.RGB, device=device)
        ok = tuple(out[0].shape) == (3, 8, 16) and out[0].device.type == torch.device(device).type
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return bool(ok)
    except Exception as exc:  # no nvJPEG in this build, no driver, ...
        log.info("batched JPEG decoding on %s is not available: %s: %s", device, type(exc).__name__, exc)
        return False


def gpu_decode_available(device: str | torch.device | None = None) -> bool:
    """Whether JPEGs can be batch-decoded on ``device`` with nvJPEG.

    Parameters
    ----------
    device
        A CUDA device (default ``"cuda"``). Any other device type gives ``False``.

    Returns
    -------
    bool
        True when CUDA is usable and this torchvision build decodes a test JPEG on that device (checked once per
        device, then cached).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _probe_device_decode(str(dev))


@functools.cache
def _native_exif(device_type: str) -> bool:
    """Whether ``decode_jpeg(..., apply_exif_orientation=True)`` really rotates on this kind of device.

    torchvision documents the flag as CPU-only and ignores it on CUDA; rather than trusting the documentation of
    whichever version is installed, decode a 16 x 8 JPEG tagged "rotate 90" and look at the output shape.
    """
    try:
        tvio = _torchvision_io()
        dev = torch.device(device_type)
        data = [_as_uint8_tensor(_tiny_jpeg(orientation=6))]
        out = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=dev, apply_exif_orientation=True)
        return tuple(out[0].shape) == (3, 16, 8)
    except Exception:  # TypeError on versions without the flag, or no decoder on that device
        return False


def use_device_decode(decode: str, device: str | torch.device) -> bool:
    """Resolve a ``decode`` choice to "use the batched pipeline of this module" (True) or "PIL workers" (False).

    Parameters
    ----------
    decode
        ``"auto"``: the batched pipeline when ``device`` is CUDA with nvJPEG, else PIL in workers. ``"gpu"``: the
        batched pipeline; on a CUDA device without nvJPEG this is an error; on a CPU device it runs the same
        pipeline with libjpeg-turbo in the main process (for tests and benchmarks). ``"cpu"``: PIL in workers.
    device
        The model's device.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        Unknown ``decode``.
    RuntimeError
        ``decode="gpu"`` on a CUDA device where batched decoding does not work.
    """
    dev = torch.device(device)
    if decode == "cpu":
        return False
    if decode == "auto":
        return gpu_decode_available(dev)
    if decode == "gpu":
        if dev.type == "cuda" and not gpu_decode_available(dev):
            raise RuntimeError(
                f"decode='gpu' was asked for, but JPEGs cannot be decoded on {dev}: this torchvision build has no "
                "nvJPEG support or CUDA is unusable. Use decode='cpu' (or 'auto')."
            )
        return True
    raise ValueError(f"decode must be 'auto', 'gpu' or 'cpu'; got {decode!r}")


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Preprocess:
    """open_clip's evaluation transform, as numbers."""

    height: int
    width: int
    resize_mode: str
    interpolation: str
    fill: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None, image_size: int | Sequence[int]) -> _Preprocess:
        cfg = dict(cfg or {})
        size = cfg.get("size", image_size)
        if isinstance(size, (int, np.integer)):
            height = width = int(size)
        else:
            height, width = (int(size[0]), int(size[-1]))
        mode = cfg.get("resize_mode") or "shortest"
        if mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unsupported resize_mode {mode!r}")
        interp = cfg.get("interpolation") or "bicubic"
        interp = "bilinear" if interp == "bilinear" else "bicubic"  # open_clip: anything else means bicubic
        mean = _triple(cfg.get("mean") or OPENAI_MEAN)
        std = _triple(cfg.get("std") or OPENAI_STD)
        fill = float(cfg.get("fill_color", 0) or 0) if mode == "longest" else 0.0
        return cls(height, width, mode, interp, fill, mean, std)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step (before crop/pad), with torchvision's and open_clip's rounding."""
        th, tw = self.height, self.width
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "shortest" and th == tw:
            # torchvision Resize(int): the short side becomes S, the long side int(S * long / short)
            if w <= h:
                return int(th * h / w), th
            return th, int(th * w / h)
        ratio_h, ratio_w = h / th, w / tw
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(h / ratio), round(w / ratio)


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, (int, float)):
        return (float(v),) * 3  # type: ignore[return-value]
    vals = [float(x) for x in v]
    return (vals[0], vals[1], vals[2]) if len(vals) >= 3 else (vals[0],) * 3  # type: ignore[return-value]


def _place(n: int, t: int) -> tuple[int, int, int]:
    """(source start, destination start, length) along one axis for torchvision's center crop-or-pad."""
    if n >= t:
        return int(round((n - t) / 2.0)), 0, t
    return 0, (t - n) // 2, n


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a ``C x H x W`` tensor, as ``PIL.ImageOps.exif_transpose`` does.

    Parameters
    ----------
    img
        The decoded image (any device).
    orientation
        EXIF orientation 1-8 (other values: unchanged).

    Returns
    -------
    torch.Tensor
        The upright image (a view or a new tensor).
    """
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


# --------------------------------------------------------------------------------------------- decoding
def _decode_list(tensors: list[torch.Tensor], device: torch.device, exif: bool) -> list[torch.Tensor]:
    tvio = _torchvision_io()
    if exif:
        return tvio.decode_jpeg(
            tensors, mode=tvio.ImageReadMode.RGB, device=device, apply_exif_orientation=True
        )
    return tvio.decode_jpeg(tensors, mode=tvio.ImageReadMode.RGB, device=device)


def _valid(img: Any) -> bool:
    return (
        isinstance(img, torch.Tensor)
        and img.ndim == 3
        and img.shape[0] in (1, 3)
        and img.shape[1] * img.shape[2] > 0
    )


def _decode_isolating(
    tensors: list[torch.Tensor], device: torch.device, exif: bool
) -> list[torch.Tensor | None]:
    """Decode a batch in one call; if that fails, image by image (a failure is None)."""
    try:
        out = _decode_list(tensors, device, exif)
        if len(out) == len(tensors) and all(_valid(x) for x in out):
            return list(out)
    except Exception as exc:
        log.debug("batched JPEG decode of %d images failed (%s); decoding one by one", len(tensors), exc)
    results: list[torch.Tensor | None] = []
    for t in tensors:
        try:
            img = _decode_list([t], device, exif)[0]
            results.append(img if _valid(img) else None)
        except Exception:
            results.append(None)
    return results


def _pil_fallback(data: bytes, device: torch.device, image_size: int) -> tuple[torch.Tensor | None, str]:
    """Decode with PIL (all of load_image's safety checks and conversions); uint8 ``3 x H x W`` on ``device``."""
    try:
        img = load_image(data, target_size=image_size)
    except Exception as exc:
        return None, _error_text(exc)
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).to(device), ""


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``3 x h x w`` images; libjpeg-turbo's are channels-last views, stacked fastest as such."""
    if all(not img.is_contiguous() and img.permute(1, 2, 0).is_contiguous() for img in images):
        return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def _resize_into(
    out: torch.Tensor,
    rows: Sequence[int],
    images: Sequence[torch.Tensor],
    spec: _Preprocess,
) -> None:
    """Resize, crop/pad and normalise ``images`` (uint8 ``3 x h x w`` on ``out.device``) into ``out[rows]``."""
    device = out.device
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=device).view(1, 3, 1, 1)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(k)
    th, tw = spec.height, spec.width
    for (h, w), members in groups.items():
        nh, nw = spec.resized_size(h, w)
        sy, dy, ly = _place(nh, th)
        sx, dx, lx = _place(nw, tw)
        per_chunk = max(1, _FLOAT_CHUNK // (3 * max(h * w, nh * nw)))
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            x = _stack([images[k] for k in chunk]).to(torch.float32)
            if (nh, nw) != (h, w):
                x = F.interpolate(
                    x, size=(nh, nw), mode=spec.interpolation, antialias=True, align_corners=False
                )
                # PIL resizes 8-bit images to 8 bits: clip and round as it does
                x = x.clamp_(0.0, 255.0).round_()
            x = x[:, :, sy : sy + ly, sx : sx + lx]
            if (ly, lx) != (th, tw):
                canvas = x.new_full((len(chunk), 3, th, tw), spec.fill)
                canvas[:, :, dy : dy + ly, dx : dx + lx] = x
                x = canvas
            x = x * scale - shift
            idx = torch.tensor([rows[k] for k in chunk], dtype=torch.long, device=device)
            out.index_copy_(0, idx, x.to(out.dtype))


def _decode_into(
    out: torch.Tensor,
    rows: Sequence[int],
    byte_tensors: Sequence[torch.Tensor],
    orientations: Sequence[int | None],
    errors: list[str],
    spec: _Preprocess,
    image_size: int,
) -> None:
    """Decode ``byte_tensors`` into ``out[rows]``; failures go to ``errors[rows[k]]``.

    ``orientations[k]`` is the EXIF orientation of a stream screened as a JPEG for the batched decoder, or None
    for a stream that must be decoded by PIL.
    """
    device = out.device
    images: list[torch.Tensor | None] = [None] * len(byte_tensors)
    jpeg = [k for k, o in enumerate(orientations) if o is not None]
    if jpeg:
        exif = _native_exif(device.type)
        if device.type == "cuda":
            # nvJPEG's hardware path writes its outputs without waiting for work queued on the caller's stream,
            # and the caching allocator may hand it a block that such work still reads (pytorch/vision#9606).
            # With nothing queued on the current stream, no such block exists.
            torch.cuda.current_stream(device).synchronize()
        decoded = _decode_isolating([byte_tensors[k] for k in jpeg], device, exif)
        for k, img in zip(jpeg, decoded):
            if img is None:
                continue
            if not exif:
                img = orient(img, int(orientations[k]))  # type: ignore[arg-type]
            images[k] = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    for k in range(len(byte_tensors)):
        if images[k] is None:  # not a plain JPEG, or the device decoder refused it: PIL decides
            img, err = _pil_fallback(byte_tensors[k].numpy().tobytes(), device, image_size)
            if img is None:
                errors[rows[k]] = err
            images[k] = img
    good = [k for k in range(len(byte_tensors)) if images[k] is not None]
    if good:
        _resize_into(out, [rows[k] for k in good], [images[k] for k in good], spec)  # type: ignore[misc]


def _empty_pixels(n: int, spec: _Preprocess, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros (rows of failed images stay zero); channels-last on CUDA, the layout the model runs in there."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    out = torch.empty((n, 3, spec.height, spec.width), device=device, dtype=dtype, memory_format=fmt)
    return out.zero_()


def decode_and_preprocess(
    byte_tensors: Sequence[torch.Tensor],
    device: str | torch.device,
    preprocess_cfg: dict[str, Any] | None,
    image_size: int,
    *,
    orientations: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[str]]:
    """Decode a batch of encoded images on ``device`` and preprocess them for a CLIP model.

    Parameters
    ----------
    byte_tensors
        Encoded images as 1-D ``uint8`` CPU tensors (JPEGs take the batched path; anything else is decoded by
        PIL and then preprocessed the same way).
    device
        Where to decode and preprocess: a CUDA device (nvJPEG) or ``"cpu"`` (libjpeg-turbo).
    preprocess_cfg
        The model's ``preprocess_cfg`` (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``,
        ``fill_color``); missing keys take open_clip's defaults.
    image_size
        Input size ``S`` (used when ``preprocess_cfg`` has no ``size``).
    orientations
        EXIF orientation of each stream when the caller already screened them (as :class:`JpegBytesDataset`
        does: every stream is then a JPEG for the batched decoder). ``None`` screens each stream here with
        :func:`screen_jpeg` (header checks, decompression-bomb limit, EXIF).
    dtype
        Output dtype.

    Returns
    -------
    pixels : torch.Tensor
        ``N x 3 x S x S`` on ``device`` (channels-last on CUDA); rows of failed images are zero.
    errors : list of str
        ``""`` for a good image, else ``"<reason>: <message>"`` with an
        :class:`~ccclip_widgets.images.ImageDecodeError` reason (``truncated``, ``corrupt``, ``unsupported``,
        ``too_large_pixels``, ...).
    """
    dev = torch.device(device)
    spec = _Preprocess.from_cfg(preprocess_cfg, image_size)
    n = len(byte_tensors)
    out = _empty_pixels(n, spec, dev, dtype)
    errors = [""] * n
    if n == 0:
        return out, errors
    if orientations is None:
        orients: list[int | None] = [screen_jpeg(t.numpy().tobytes()) for t in byte_tensors]
    else:
        orients = [int(o) for o in orientations]
    _decode_into(out, list(range(n)), list(byte_tensors), orients, errors, spec, image_size)
    return out, errors
