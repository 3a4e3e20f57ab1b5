"""Model loading: specs, checkpoints round trip, fingerprints, offline hub errors, no unpickling."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ccclip_widgets.embed import encode_images, encode_texts
from ccclip_widgets.models import (
    ModelLoadError,
    ModelUnavailableError,
    load_model,
    save_checkpoint,
    select_device,
)


def test_random_weights_need_explicit_permission(tiny_arch):
    with pytest.raises(ModelLoadError, match="allow_random=True"):
        load_model(f"{tiny_arch}:random", device="cpu")
    with pytest.raises(ModelLoadError, match="names no weights"):
        load_model(tiny_arch, device="cpu")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m = load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)
    assert m.embed_dim == 32 and m.image_size == 32 and m.context_length == 32


def test_checkpoint_round_trip_gives_identical_embeddings(tiny_model, tmp_path, shape_posts):
    folder = save_checkpoint(tiny_model, tmp_path / "ck", provenance={"note": "test"})
    meta = json.loads((folder / "ccclip.json").read_text())
    assert meta["architecture"] == tiny_model.name and meta["fingerprint"] == tiny_model.fingerprint
    assert not list(tmp_path.glob(".ck*")), "no temporary folder left behind"
    loaded = load_model(folder, device="cpu")
    assert loaded.fingerprint == tiny_model.fingerprint
    assert loaded.provenance["note"] == "test"
    texts = ["a red square", "a blue circle"]
    np.testing.assert_array_equal(encode_texts(tiny_model, texts), encode_texts(loaded, texts))
    paths = shape_posts.table["image_path"].to_list()[:4]
    np.testing.assert_array_equal(encode_images(tiny_model, paths), encode_images(loaded, paths))
    # the same folder through the other spec forms
    assert load_model(f"local-dir:{folder}", device="cpu").fingerprint == tiny_model.fingerprint
    assert (
        load_model(folder / "open_clip_model.safetensors", device="cpu").fingerprint == tiny_model.fingerprint
    )


def test_checkpoint_loads_in_plain_open_clip(tiny_model, tmp_path):
    import open_clip

    folder = save_checkpoint(tiny_model, tmp_path / "ck")
    plain = open_clip.create_model(f"local-dir:{folder}")
    ours = tiny_model.model.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, ours[k])
    # pretrained=<file> with the architecture name works too
    plain2 = open_clip.create_model(tiny_model.name, pretrained=str(folder / "open_clip_model.safetensors"))
    torch.testing.assert_close(plain2.visual.conv1.weight, tiny_model.model.visual.conv1.weight)


def test_arch_plus_local_weights_file(tiny_model, tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}, str(f))
    m = load_model(f"{tiny_model.name}:{f}", device="cpu")
    assert m.fingerprint == tiny_model.fingerprint
    # a .pt file is read with weights_only=True: a pickled object is refused, not executed
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": object()}}, evil)
    with pytest.raises(ModelLoadError):
        load_model(f"{tiny_model.name}:{evil}", device="cpu")


def test_fingerprint_changes_with_weights(tiny_model):
    before = tiny_model.fingerprint
    with torch.no_grad():
        tiny_model.model.visual.conv1.weight[0, 0, 0, 0] += 1.0
    assert tiny_model.fingerprint == before  # cached until told
    tiny_model.invalidate_fingerprint()
    assert tiny_model.fingerprint != before


def test_hub_tag_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        load_model("ViT-B-32:laion2b_s34b_b79k", device="cpu")
    msg = str(info.value)
    assert (
        "HF_HUB_OFFLINE=1" in msg
        and "local-dir:" in msg
        and "ViT-B-32:/path" in msg.replace("ARCH", "ViT-B-32")
    )


@pytest.mark.parametrize(
    "spec, match",
    [
        ("NoSuchArch-1:foo", "Unknown model architecture"),
        ("ViT-B-32:not_a_tag", "neither a file nor a known pretrained tag"),
        ("ViT-B-32:/nonexistent/weights.safetensors", "Checkpoint file not found"),
        ("local-dir:/nonexistent/folder", "local-dir folder not found"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, device="cpu")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a model"):
        load_model(tmp_path, device="cpu")


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device(None).type in ("cpu", "cuda", "mps")


def test_truncation_counted(tiny_model):
    long = "word " * 200
    assert tiny_model.count_truncated(["short", long, long]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = encode_texts(tiny_model, [long])  # truncated, not an error
    assert v.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
