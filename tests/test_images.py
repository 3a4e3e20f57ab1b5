"""Tests for ccclip_widgets.images: safe decoding of generated images."""

from __future__ import annotations

import base64
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccclip_widgets.images import (
    DEFAULT_MAX_ASPECT,
    ImageDecodeError,
    ImageInfo,
    load_image,
    make_thumbnail,
    probe_image,
    thumbnail_data_uri,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)


def _close(pixel: tuple[int, ...], expected: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def _half_red_half_blue(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", (width, height), RED)
    im.paste(BLUE, (width // 2, 0, width, height))
    return im


@pytest.fixture
def jpeg_path(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    _half_red_half_blue(640, 480).save(path, "JPEG", quality=95)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Probing


def test_probe_reads_header(jpeg_path: Path) -> None:
    info = probe_image(jpeg_path)
    assert info == ImageInfo(width=640, height=480, format="JPEG", mode="RGB", n_frames=1)


def test_probe_accepts_str_path_and_bytes(jpeg_path: Path) -> None:
    assert probe_image(str(jpeg_path)).width == 640
    assert probe_image(jpeg_path.read_bytes()).height == 480


def test_probe_counts_frames(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    info = probe_image(path)
    assert (info.format, info.n_frames) == ("GIF", 3)


@pytest.mark.parametrize("loader", [probe_image, load_image])
def test_missing_file(tmp_path: Path, loader) -> None:
    with pytest.raises(ImageDecodeError) as err:
        loader(tmp_path / "nope.jpg")
    assert err.value.reason == "missing"
    assert "nope.jpg" in str(err.value)


@pytest.mark.parametrize("loader", [probe_image, load_image])
def test_zero_byte_file(tmp_path: Path, loader) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as err:
        loader(path)
    assert err.value.reason == "empty"
    with pytest.raises(ImageDecodeError) as err:
        loader(b"")
    assert err.value.reason == "empty"


@pytest.mark.parametrize("loader", [probe_image, load_image])
def test_text_file_named_jpg(tmp_path: Path, loader) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError) as err:
        loader(path)
    assert err.value.reason == "unsupported"
    assert isinstance(err.value, ValueError)


def test_error_pickles(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as err:
        load_image(tmp_path / "nope.png")
    copy = pickle.loads(pickle.dumps(err.value))
    assert (copy.reason, str(copy)) == (err.value.reason, str(err.value))


def test_broken_jpeg_header_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    with pytest.raises(ImageDecodeError) as err:
        probe_image(path)
    assert err.value.reason == "corrupt"


def test_too_many_bytes(jpeg_path: Path) -> None:
    with pytest.raises(ImageDecodeError) as err:
        probe_image(jpeg_path, max_bytes=100)
    assert err.value.reason == "too_large_bytes"
    with pytest.raises(ImageDecodeError) as err:
        load_image(jpeg_path.read_bytes(), max_bytes=100)
    assert err.value.reason == "too_large_bytes"


def test_ghostscript_formats_are_not_opened(tmp_path: Path) -> None:
    path = tmp_path / "evil.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert err.value.reason == "unsupported"


# ----------------------------------------------------------------------------------------------------------------
# Decompression bombs and truncation


@pytest.fixture
def bomb_png(tmp_path: Path) -> Path:
    """A 9000x9000 1-bit PNG: 81 megapixels declared, about 10 kB on disk."""
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000), 0).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    return path


@pytest.mark.parametrize("loader", [probe_image, load_image])
def test_decompression_bomb_refused_before_decoding(bomb_png: Path, loader) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError) as err:
        loader(bomb_png, max_pixels=10_000_000)
    assert err.value.reason == "too_large_pixels"
    assert "9000x9000" in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == before  # the global limit is never touched


def test_default_pixel_limit_refuses_bomb(bomb_png: Path) -> None:
    with pytest.raises(ImageDecodeError) as err:
        load_image(bomb_png)
    assert err.value.reason == "too_large_pixels"


def test_pil_bomb_error_is_converted(bomb_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Our own limit is above PIL's: PIL's DecompressionBombError must still come out as ImageDecodeError.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageDecodeError) as err:
        probe_image(bomb_png, max_pixels=10**9)
    assert err.value.reason == "too_large_pixels"


def test_pil_bomb_warning_as_error_is_converted(bomb_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError) as err:
            probe_image(bomb_png, max_pixels=10**9)
    assert err.value.reason == "too_large_pixels"


def test_truncated_jpeg_raises(jpeg_path: Path, tmp_path: Path) -> None:
    data = jpeg_path.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    probe_image(path)  # the header is intact: probing cannot tell
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert err.value.reason == "truncated"
    with pytest.raises(ImageDecodeError):
        load_image(path, target_size=64)


def test_truncated_png_raises(tmp_path: Path) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    with pytest.raises(ImageDecodeError) as err:
        load_image(data[: len(data) // 2])
    assert err.value.reason in {"truncated", "corrupt"}


# ----------------------------------------------------------------------------------------------------------------
# Orientation, modes, frames


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _half_red_half_blue(64, 32).save(path, "JPEG", quality=95, exif=exif)
    im = load_image(path)
    assert im.size == (32, 64)
    # Clockwise rotation puts the stored left (red) half on top.
    assert _close(im.getpixel((16, 8)), RED)
    assert _close(im.getpixel((16, 56)), BLUE)


def test_exif_orientation_with_reduced_decoding(tmp_path: Path) -> None:
    path = tmp_path / "rotated_big.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _half_red_half_blue(640, 320).save(path, "JPEG", quality=95, exif=exif)
    im = load_image(path, target_size=64)
    assert im.size[0] < im.size[1] and min(im.size) >= 64
    assert _close(im.getpixel((im.size[0] // 2, im.size[1] // 4)), RED)
    assert _close(im.getpixel((im.size[0] // 2, 3 * im.size[1] // 4)), BLUE)


def test_rgb_jpeg_plain(jpeg_path: Path) -> None:
    im = load_image(jpeg_path)
    assert im.mode == "RGB" and im.size == (640, 480)
    assert _close(im.getpixel((10, 10)), RED)
    assert _close(im.getpixel((630, 470)), BLUE)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, index 1 red
    im.paste(1, (5, 0, 10, 10))
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == WHITE  # transparent black -> white, not black
    assert out.getpixel((8, 1)) == RED


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK
    assert probe_image(path).mode == "CMYK"
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(out.getpixel((8, 8)), RED)


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 5, 10))
    im.paste((255, 0, 0, 128), (5, 0, 10, 10))
    im.save(path)
    out = load_image(path)
    assert out.getpixel((2, 2)) == BLUE
    assert _close(out.getpixel((7, 2)), (255, 127, 127), tol=2)  # half-transparent red over white


def test_la_png_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == WHITE


def test_16bit_greyscale_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "grey16.png"
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert probe_image(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32bit_int_and_float_modes() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(buf, "TIFF")
    assert np.asarray(load_image(buf.getvalue()))[0, :, 0].tolist() == [0, 255]
    buf = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(buf, "TIFF")
    assert np.asarray(load_image(buf.getvalue()))[0, :, 0].tolist() == [0, 128, 255]


def test_1bit_image(tmp_path: Path) -> None:
    path = tmp_path / "mono.png"
    im = Image.new("1", (8, 8), 0)
    im.paste(1, (4, 0, 8, 8))
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((7, 0)) == WHITE


def test_greyscale_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "grey.jpg"
    Image.new("L", (300, 300), 200).save(path)
    out = load_image(path, target_size=64)
    assert out.mode == "RGB"
    assert _close(out.getpixel((5, 5)), (200, 200, 200), tol=3)


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (GREEN, RED, BLUE)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert _close(out.getpixel((4, 4)), GREEN, tol=5)


def test_animated_webp_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (8, 8), c) for c in (BLUE, RED)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert probe_image(path).n_frames == 2
    assert _close(load_image(path).getpixel((4, 4)), BLUE, tol=5)


def test_result_is_detached_from_file(jpeg_path: Path) -> None:
    im = load_image(jpeg_path)
    assert not hasattr(im, "fp") or im.fp is None
    jpeg_path.unlink()  # the file can go away (and on Windows, would not be locked)
    assert im.getpixel((0, 0))


# ----------------------------------------------------------------------------------------------------------------
# Geometry


def test_jpeg_draft_reduces_but_not_below_target(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _half_red_half_blue(2000, 1200).save(path, "JPEG")
    out = load_image(path, target_size=224)
    assert min(out.size) >= 224
    assert min(out.size) <= 2 * 224
    assert out.size[0] / out.size[1] == pytest.approx(2000 / 1200, rel=0.02)


def test_target_size_downscales_png(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (1000, 800), GREEN).save(path)
    out = load_image(path, target_size=100)
    assert out.size == (250, 200)


def test_small_image_not_upscaled(jpeg_path: Path) -> None:
    assert load_image(jpeg_path, target_size=1024).size == (640, 480)


def test_extreme_aspect_letterboxed(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    Image.new("RGB", (10000, 10), RED).save(path)
    out = load_image(path)
    assert out.size == (10000, int(10000 / DEFAULT_MAX_ASPECT))
    assert out.getpixel((5000, 625)) == RED  # content centered
    assert out.getpixel((5000, 0)) == WHITE  # padding
    small = load_image(path, target_size=224)
    assert small.size == (3584, 448)  # shorter side of the letterboxed canvas = 2 * target
    assert small.getpixel((1792, 224)) == RED


def test_extreme_aspect_vertical(tmp_path: Path) -> None:
    path = tmp_path / "tall.png"
    Image.new("RGB", (10, 400), BLUE).save(path)
    out = load_image(path, max_aspect=4.0)
    assert out.size == (100, 400)
    assert out.getpixel((50, 200)) == BLUE
    assert out.getpixel((0, 200)) == WHITE


def test_letterbox_canvas_bounded_by_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "line.png"
    Image.new("RGB", (20000, 1), RED).save(path)
    out = load_image(path, max_pixels=1_000_000)
    assert out.size[0] * out.size[1] <= 1_000_000
    assert out.size[0] / out.size[1] == pytest.approx(DEFAULT_MAX_ASPECT, rel=0.01)


def test_rejects_bad_target_size(jpeg_path: Path) -> None:
    with pytest.raises(ValueError):
        load_image(jpeg_path, target_size=0)


# ----------------------------------------------------------------------------------------------------------------
# Thumbnails


def test_make_thumbnail_webp(jpeg_path: Path) -> None:
    data = make_thumbnail(jpeg_path, size=64)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "WEBP"
        assert max(im.size) == 64
        assert im.size == (64, 48)


def test_make_thumbnail_png_and_bad_format(jpeg_path: Path) -> None:
    with Image.open(io.BytesIO(make_thumbnail(jpeg_path, size=32, format="png"))) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError):
        make_thumbnail(jpeg_path, format="BMPX")


def test_thumbnail_data_uri(jpeg_path: Path) -> None:
    uri = thumbnail_data_uri(jpeg_path, size=32)
    assert uri.startswith("data:image/webp;base64,")
    raw = base64.b64decode(uri.split(",", 1)[1])
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"
    assert thumbnail_data_uri(jpeg_path, size=32, format="JPEG").startswith("data:image/jpeg;base64,")


def test_thumbnail_propagates_decode_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_text("nope")
    with pytest.raises(ImageDecodeError):
        make_thumbnail(path)
