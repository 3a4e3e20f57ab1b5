"""The tutorial notebooks' starting point: demo data, or a generated stand-in when the demo cannot load."""

from __future__ import annotations

import pytest

import ccclip_widgets.models as models
from ccclip_widgets.demo.tutorial import stand_in_records, tutorial_data
from ccclip_widgets.errors import ModelLoadError


def test_stand_in_records_write_images_and_both_caption_kinds(tmp_path):
    records = stand_in_records(tmp_path / "img")
    assert len(records) == 48
    assert {r["caption_kind"] for r in records} == {"descriptive", "commentative"}
    assert {r["split"] for r in records} == {"train", "test"}
    assert all((tmp_path / "img" / r["image"]).is_file() for r in records)


def test_falls_back_when_the_demo_model_cannot_load(monkeypatch, capsys):
    real = models.load_model

    def failing(spec, *args, **kwargs):
        if spec == "demo":
            raise ModelLoadError("simulated: no demo weights")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", failing)
    posts, clip, fallback = tutorial_data("demo", "demo", seed=1)
    assert fallback
    assert "Demo model unavailable" in capsys.readouterr().out
    assert len(posts) == 48 and len(posts.rejects) == 0
    assert clip.embed_dim == 32


def test_a_model_other_than_the_demo_fails_loudly(monkeypatch):
    def failing(spec, *args, **kwargs):
        raise ModelLoadError("simulated")

    monkeypatch.setattr(models, "load_model", failing)
    with pytest.raises(ModelLoadError):
        tutorial_data("demo", "ViT-B-32:laion2b_s34b_b79k")
