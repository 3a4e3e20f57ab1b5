"""Batched JPEG decoding + device-side preprocessing (ccclip_widgets.gpu_decode), exercised on the CPU."""

from __future__ import annotations

import inspect
import io
import threading
from pathlib import Path

import numpy as np
import open_clip
import polars as pl
import pytest
import torch
from ccclip_testkit import make_shape_posts
from PIL import Image, ImageOps

import ccclip_widgets.decode_device as dd
import ccclip_widgets.gpu_decode as gd
from ccclip_widgets.embed import _ImageDataset, embed_posts, encode_images
from ccclip_widgets.images import ImageDecodeError, load_image
from ccclip_widgets.posts import read_posts

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CFG_224 = {
    "size": [224, 224],
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "fill_color": 0,
}
# One unit of a normalised pixel is about 0.27 * 255 = 69 grey levels: 0.01 is less than one grey level.
MEAN_TOL = 0.01


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour noise plus a few hard edges: JPEG-like content with detail at several scales."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).copy()
    arr[: height // 3, : width // 4] = (250, 20, 20)  # a red block top-left marks the orientation
    arr[height // 2 :, width // 2 : width // 2 + 3] = 255
    return Image.fromarray(arr)


def _jpeg(img: Image.Image, quality: int = 90, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _t(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _reference(data: bytes | Path | str, preprocess, size: int | None = None) -> torch.Tensor:
    """load_image + open_clip's preprocess.

    With ``size`` this is exactly the plain CPU pipeline, which decodes JPEGs at reduced size (DCT scaling) when
    the shorter side is at least twice ``size``; without it, open_clip's transform of the full-size image, which
    is what the batched path computes (it has no reduced-size decoding).
    """
    return preprocess(load_image(data, target_size=size))


@pytest.fixture(scope="module")
def pre224():
    return open_clip.image_transform(224, is_train=False)


# --------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("size", [(400, 300), (300, 400), (64, 48), (224, 224), (1000, 150), (225, 301)])
def test_pixels_close_to_pil_preprocess(size, pre224):
    data = _jpeg(_photo(*size))
    px, err = gd.decode_and_preprocess([_t(data)], "cpu", CFG_224, 224)
    assert err == [""]
    ref = _reference(data, pre224, 224)
    assert px.shape == (1, 3, 224, 224) and px.dtype == torch.float32
    diff = (px[0] - ref).abs()
    assert float(diff.mean()) < MEAN_TOL, float(diff.mean())
    assert float(diff.max()) < 0.25  # hard edges: PIL clips to 8 bits between its two passes


def test_mixed_sizes_in_one_batch_keep_their_rows(pre224):
    datas = [_jpeg(_photo(w, h, seed=i)) for i, (w, h) in enumerate([(400, 300), (320, 240), (400, 300)])]
    px, err = gd.decode_and_preprocess([_t(d) for d in datas], "cpu", CFG_224, 224)
    assert err == ["", "", ""]
    for row, d in enumerate(datas):
        assert float((px[row] - _reference(d, pre224, 224)).abs().mean()) < MEAN_TOL


@pytest.mark.parametrize("mode", ["longest", "squash"])
def test_other_resize_modes_match_open_clip(mode):
    pre = open_clip.image_transform(64, is_train=False, resize_mode=mode, fill_color=0)
    cfg = dict(CFG_224, size=[64, 64], resize_mode=mode)
    for w, h in [(160, 90), (90, 160)]:
        data = _jpeg(_photo(w, h))
        px, err = gd.decode_and_preprocess([_t(data)], "cpu", cfg, 64)
        assert err == [""]
        assert float((px[0] - _reference(data, pre, 64)).abs().mean()) < MEAN_TOL


def test_greyscale_jpeg(pre224):
    data = _jpeg(_photo(320, 240).convert("L"))
    px, err = gd.decode_and_preprocess([_t(data)], "cpu", CFG_224, 224)
    assert err == [""]
    assert float((px[0] - _reference(data, pre224, 224)).abs().mean()) < MEAN_TOL


@pytest.mark.parametrize("kind", ["cmyk", "png"])
def test_non_plain_jpeg_goes_to_pil(kind, pre224):
    img = _photo(320, 240)
    if kind == "cmyk":
        data = _jpeg(img.convert("CMYK"))
    else:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data = buf.getvalue()
    assert gd.screen_jpeg(data) is None
    px, err = gd.decode_and_preprocess([_t(data)], "cpu", CFG_224, 224)
    assert err == [""]
    assert float((px[0] - _reference(data, pre224, 224)).abs().mean()) < MEAN_TOL


# --------------------------------------------------------------------------------------------- failures
def test_bad_images_are_errors_with_reasons_and_others_are_fine(pre224):
    good = _jpeg(_photo(400, 300))
    truncated = good[: len(good) // 2]
    not_image = b"this is a caption, not a picture\n" * 20
    px, err = gd.decode_and_preprocess(
        [_t(good), _t(truncated), _t(not_image), _t(good)], "cpu", CFG_224, 224
    )
    assert err[0] == err[3] == ""
    assert err[1].startswith("truncated: ")
    assert err[2].startswith("unsupported: ")
    assert torch.count_nonzero(px[1]) == 0 and torch.count_nonzero(px[2]) == 0
    ref = _reference(good, pre224, 224)
    for row in (0, 3):
        assert float((px[row] - ref).abs().mean()) < MEAN_TOL


def test_decompression_bomb_is_refused_from_the_header():
    data = _jpeg(Image.new("RGB", (3000, 2000), (10, 20, 30)))
    assert gd.screen_jpeg(data, max_pixels=1_000_000) is None
    ds = gd.JpegBytesDataset([data], lambda im: torch.zeros(3, 32, 32), 32, max_pixels=1_000_000)
    _, payload, _, ready, error = ds[0]
    assert payload is None and ready is None and error.startswith("too_large_pixels: ")


def test_batch_failure_is_isolated_image_by_image(monkeypatch, pre224):
    good = [_jpeg(_photo(400, 300, seed=s)) for s in range(3)]
    refused, broken = good[1], good[2]  # the device decoder refuses both; PIL rescues one, not the other
    real_decode, real_load = dd._decode_list, dd.load_image
    calls: list[int] = []

    def picky_decode(tensors, device, exif):
        calls.append(len(tensors))
        if any(t.numel() in (len(refused), len(broken)) for t in tensors):
            raise RuntimeError("nvjpeg: Failed to decode batch")
        return real_decode(tensors, device, exif)

    def picky_load(source, **kw):
        if isinstance(source, bytes) and source == broken:
            raise ImageDecodeError("<bytes>", "corrupt", "cannot decode the pixels")
        return real_load(source, **kw)

    monkeypatch.setattr(dd, "_decode_list", picky_decode)
    monkeypatch.setattr(dd, "load_image", picky_load)
    px, err = gd.decode_and_preprocess([_t(d) for d in good], "cpu", CFG_224, 224)
    assert calls == [3, 1, 1, 1]  # the batch, then one by one
    assert err[0] == err[1] == "" and err[2].startswith("corrupt: ")
    for row in (0, 1):
        assert float((px[row] - _reference(good[row], pre224, 224)).abs().mean()) < MEAN_TOL


# --------------------------------------------------------------------------------------------- orientation
def _exif_bytes(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pil_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=_exif_bytes(orientation))  # lossless, so exact
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    got = gd.orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("native", [True, False])
def test_exif_rotated_jpeg_is_upright_like_pil(native, monkeypatch, pre224):
    if not native:  # the CUDA path: orientation read from the header, applied to the decoded tensor
        monkeypatch.setattr(dd, "_native_exif", lambda device_type: False)
    else:
        assert dd._native_exif("cpu")
    img = _photo(400, 240)
    datas = [_jpeg(img, exif=_exif_bytes(o)) for o in range(1, 9)]
    assert [gd.exif_orientation(d) for d in datas] == list(range(1, 9))
    # through the worker dataset, as the pipeline does it
    batch = gd.collate_encoded([gd.JpegBytesDataset(datas, pre224, 224)[i] for i in range(8)])
    assert batch.orientations.tolist() == list(range(1, 9))
    px, err = gd.decode_and_preprocess(
        batch.byte_tensors, "cpu", CFG_224, 224, orientations=batch.orientations.tolist()
    )
    assert err == [""] * 8
    for o, d in enumerate(datas, start=1):
        ref = _reference(d, pre224, 224)
        assert float((px[o - 1] - ref).abs().mean()) < MEAN_TOL, o


# --------------------------------------------------------------------------------------------- pipeline
@pytest.fixture
def mixed_sources(tmp_path: Path) -> list:
    """Good JPEG files of two sizes, bytes, a PNG, CMYK, greyscale, a truncated JPEG, a text file, a missing path."""
    files = {}
    for i, (w, h) in enumerate([(400, 300), (300, 400), (400, 300), (160, 120)]):
        files[f"ok{i}.jpg"] = _jpeg(_photo(w, h, seed=i))
    files["grey.jpg"] = _jpeg(_photo(200, 150, seed=7).convert("L"))
    files["cmyk.jpg"] = _jpeg(_photo(200, 150, seed=8).convert("CMYK"))
    buf = io.BytesIO()
    _photo(120, 90, seed=9).save(buf, "PNG")
    files["pic.png"] = buf.getvalue()
    files["cut.jpg"] = files["ok0.jpg"][:3000]
    files["notes.jpg"] = b"not an image at all" * 10
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sources: list = [str(tmp_path / n) for n in files]
    sources.insert(2, _jpeg(_photo(240, 180, seed=11)))  # encoded bytes instead of a path
    sources.append(str(tmp_path / "gone.jpg"))
    return sources


def _source_bytes(source: str | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_matches_plain_cpu_pipeline(tiny_model, mixed_sources, workers):
    plain = _ImageDataset(mixed_sources, tiny_model.preprocess, tiny_model.image_size)
    expected = [plain[i] for i in range(len(mixed_sources))]
    seen: list[int] = []
    for idx, pixels, errors in gd.iter_decoded_batches(
        tiny_model, mixed_sources, batch_size=5, num_workers=workers
    ):
        assert pixels.shape == (len(idx), 3, tiny_model.image_size, tiny_model.image_size)
        for row, i in enumerate(idx.tolist()):
            _, ref, ref_err = expected[i]
            assert errors[row].split(":", 1)[0] == ref_err.split(":", 1)[0], (i, errors[row], ref_err)
            if ref_err:
                assert torch.count_nonzero(pixels[row]) == 0
            elif gd.screen_jpeg(_source_bytes(mixed_sources[i])) is None:  # PIL in the worker: identical
                torch.testing.assert_close(pixels[row], ref)
            else:
                full = _reference(mixed_sources[i], tiny_model.preprocess)
                assert float((pixels[row] - full).abs().mean()) < MEAN_TOL, i
            seen.append(i)
    assert seen == list(range(len(mixed_sources)))
    reasons = {Path(str(s)).name: e for s, (_, _, e) in zip(mixed_sources, expected) if e}
    assert set(reasons) == {"cut.jpg", "notes.jpg", "gone.jpg"}
    assert reasons["cut.jpg"].startswith("truncated")
    assert reasons["notes.jpg"].startswith("unsupported")
    assert reasons["gone.jpg"].startswith("missing")


def test_embeddings_close_to_pil_path(tiny_model, tmp_path):
    paths = []
    for i, (w, h) in enumerate([(400, 300), (300, 400), (640, 480), (256, 256), (500, 200), (333, 222)]):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(_jpeg(_photo(w, h, seed=20 + i)))
        paths.append(str(p))
    # the model's transform of the full-size images (encode_images would decode these at reduced size for a
    # 32-pixel model; see _reference)
    ref = encode_images(tiny_model, torch.stack([_reference(p, tiny_model.preprocess) for p in paths]))
    (idx, pixels, errors), *rest = list(gd.iter_decoded_batches(tiny_model, paths, batch_size=len(paths)))
    assert not rest and errors == [""] * len(paths)
    got = encode_images(tiny_model, pixels)
    cos = (ref * got).sum(axis=1)
    assert cos.min() > 0.99, cos
    assert np.abs(ref - got).max() < 0.05


def test_collate_keeps_streams_and_ready_tensors(pre224):
    datas = [_jpeg(_photo(80, 60, seed=s)) for s in range(3)]
    buf = io.BytesIO()
    _photo(80, 60).save(buf, "PNG")
    ds = gd.JpegBytesDataset([datas[0], buf.getvalue(), datas[1], datas[2]], pre224, 224)
    batch = gd.collate_encoded([ds[i] for i in range(4)])
    assert batch.jpeg_rows.tolist() == [0, 2, 3] and batch.ready_rows.tolist() == [1]
    assert [bytes(t.numpy()) for t in batch.byte_tensors] == datas
    assert batch.ready.shape == (1, 3, 224, 224) and batch.errors == [""] * 4


def test_device_choice_on_a_cpu_machine():
    assert gd.gpu_decode_available("cpu") is False
    assert gd.use_device_decode("cpu", "cpu") is False
    assert gd.use_device_decode("auto", "cpu") is False
    assert gd.use_device_decode("gpu", "cpu") is True  # same pipeline, libjpeg-turbo in the main process
    with pytest.raises(ValueError):
        gd.use_device_decode("nvjpeg", "cpu")
    if not torch.cuda.is_available():
        assert gd.gpu_decode_available() is False


def test_background_thread_matches_inline_and_stops_early(tiny_model, mixed_sources):
    inline = list(gd.iter_decoded_batches(tiny_model, mixed_sources, batch_size=4))
    threaded = list(
        gd.iter_decoded_batches(tiny_model, mixed_sources, batch_size=4, num_workers=2, background=True)
    )
    assert len(inline) == len(threaded) == 3
    for (i1, p1, e1), (i2, p2, e2) in zip(inline, threaded):
        assert i1.tolist() == i2.tolist() and e1 == e2
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    batches = gd.iter_decoded_batches(tiny_model, mixed_sources, batch_size=2, prefetch=1, background=True)
    next(batches)
    batches.close()  # the consumer stops early: the thread (and its DataLoader) must end
    assert not [t for t in threading.enumerate() if t.name == "ccclip-gpu-decode" and t.is_alive()]


def test_background_thread_errors_reach_the_caller(tiny_model, mixed_sources, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(gd, "_process_batch", boom)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        list(gd.iter_decoded_batches(tiny_model, mixed_sources, batch_size=4, background=True))


@pytest.mark.skipif(
    "decode" not in inspect.signature(embed_posts).parameters,
    reason="embed_posts has no decode parameter yet (gpu_decode integration not applied)",
)
def test_embed_posts_decode_gpu_matches_cpu(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")  # 24 posts
    posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs", check_images="none")
    bad = Path(posts.table["image_path"][5])
    bad.write_bytes(bad.read_bytes()[:300])  # truncated after the table was read
    kw = {"show_progress": False, "num_workers": 2, "batch_size": 8}
    a = embed_posts(posts, tiny_model, store=tmp_path / "a", decode="cpu", **kw)
    b = embed_posts(posts, tiny_model, store=tmp_path / "b", decode="gpu", **kw)
    assert a.post_ids == b.post_ids and len(a) == 23
    assert len(a.rejects) == 1 and a.rejects["reason"].to_list() == b.rejects["reason"].to_list()
    np.testing.assert_allclose(a.text, b.text, atol=1e-6)
    assert float((a.image * b.image).sum(axis=1).min()) > 0.999
    assert a.stats["texts_truncated"] == b.stats["texts_truncated"]
