"""Fine-tuning end to end on the tiny random CLIP and the synthetic shapes: learning, locking, resume, LoRA,
guards. Runs on the CPU in seconds; bit-identity checks rely on CPU determinism."""

from __future__ import annotations

import copy
import json
import threading
import warnings
from pathlib import Path

import polars as pl
import pytest
import torch

from ccclip_widgets.models import load_model
from ccclip_widgets.posts import Posts, posts_from_records
from ccclip_widgets.train import (
    FineTuneConfig,
    LoraSettings,
    TrainingDivergedError,
    TrainingOutOfMemoryError,
    fine_tune,
    merge_lora,
)
from ccclip_widgets.train.checkpoint import TRAINER_STATE, list_checkpoints, load_trainer_state


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train much faster on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FAST = {
    "lr": 1e-3,
    "warmup_steps": 1,
    "show_progress": False,
    "checkpoint_every_steps": 0,
    "eval_at_start": False,
}


def _cfg(**kw) -> FineTuneConfig:
    return FineTuneConfig(**{**FAST, **kw})


def _fresh(tiny_arch: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(f"{tiny_arch}:random", device="cpu", allow_random=True)


def _state(clip) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------------ learning
def test_loss_goes_down_and_retrieval_goes_up(tiny_model, shape_posts):
    steps = []
    evals = []
    cfg = _cfg(epochs=14, batch_size=12, lr=2e-3, eval_at_start=True, eval_every_steps=1000, augment=False)
    result = fine_tune(
        tiny_model, shape_posts, cfg, eval_posts=shape_posts, on_step=steps.append, on_eval=evals.append
    )
    assert result.steps == 28 and result.stopped == "finished" and len(steps) == 28
    first = sum(s.loss for s in steps[:3]) / 3
    last = sum(s.loss for s in steps[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert [e.step for e in evals] == [0, 28]
    before, after = evals[0].metrics, evals[-1].metrics
    for direction in ("text_to_image", "image_to_text"):
        assert after[f"{direction}/all/r_at_1"] >= before[f"{direction}/all/r_at_1"] + 0.25
        assert after[f"{direction}/all/median_rank"] < before[f"{direction}/all/median_rank"]
    assert result.final_metrics["text_to_image/descriptive/r_at_5"] >= 0.75
    assert result.metrics_table().height == 6  # all, descriptive, lang=en x 2 directions
    assert 0 < steps[-1].logit_scale <= 100 and steps[-1].samples_per_s > 0
    assert result.model is tiny_model and not tiny_model.model.training
    assert all(p.requires_grad for p in tiny_model.model.parameters())  # flags restored
    assert "28/28 steps" in result.summary()


# ------------------------------------------------------------------------------------------------ what trains
@pytest.mark.parametrize(
    ("kwargs", "must_stay", "must_change"),
    [
        ({"lock_image": True}, ("visual.",), ("transformer.resblocks.0.", "text_projection")),
        (
            {"lock_image": True, "unlock_last_image_blocks": 1, "lock_text": True},
            (
                "visual.transformer.resblocks.0.",
                "visual.conv1",
                "visual.ln_pre",
                "transformer.",
                "token_embedding",
            ),
            ("visual.transformer.resblocks.1.", "visual.proj", "visual.ln_post"),
        ),
        (
            {"train_projections_only": True},
            ("visual.transformer.", "visual.conv1", "transformer.", "token_embedding", "ln_final"),
            ("visual.proj", "text_projection"),
        ),
    ],
    ids=["lock-image", "unlock-last-image-block", "projections-only"],
)
def test_locked_weights_stay_bit_identical(tiny_model, shape_posts, kwargs, must_stay, must_change):
    before = _state(tiny_model)
    result = fine_tune(tiny_model, shape_posts, _cfg(max_steps=2, batch_size=8, **kwargs))
    changed = _changed(before, _state(tiny_model))
    for key in before:
        if key.startswith(must_stay) and key != "logit_scale":
            assert key not in changed, f"{key} is locked but changed"
    for prefix in must_change:
        assert any(k.startswith(prefix) for k in changed), f"nothing under {prefix} trained"
    if kwargs.get("train_projections_only"):
        assert changed <= {"visual.proj", "text_projection", "logit_scale"}
        assert result.trainable_params["total"] == 64 * 32 * 2 + 1


# ------------------------------------------------------------------------------------------------ resume
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_arch, shape_posts, tmp_path):
    cfg = _cfg(epochs=3, batch_size=8, checkpoint_every_steps=2, keep_checkpoints=2)
    a = _fresh(tiny_arch)
    ra = fine_tune(a, shape_posts, cfg, out_dir=tmp_path / "a")
    assert ra.steps == 9

    b = _fresh(tiny_arch)
    stop = threading.Event()
    rb = fine_tune(
        b,
        shape_posts,
        cfg,
        out_dir=tmp_path / "b",
        stop_event=stop,
        on_step=lambda i: i.step == 5 and stop.set(),
    )
    assert rb.stopped == "user" and rb.steps == 5 and rb.final_dir is None
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-0000004", "checkpoint-0000005"]
    state = load_trainer_state(tmp_path / "b" / "checkpoint-0000005")
    assert state["step"] == 5 and state["epoch"] == 1 and state["batch_in_epoch"] == 2
    assert set(state["rng"]) >= {"python", "numpy", "torch"} and state["config"] == cfg.to_dict()
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "stopped"

    c = _fresh(tiny_arch)
    rc = fine_tune(c, shape_posts, cfg, resume_from=tmp_path / "b")
    assert rc.steps == 9 and rc.stopped == "finished" and rc.output_dir == tmp_path / "b"
    assert [h["loss"] for h in rc.history] == [h["loss"] for h in ra.history]
    assert not _changed(_state(a), _state(c)), "resumed weights differ from the uninterrupted run"
    assert a.fingerprint == c.fingerprint
    # the last-K rule kept two resumable checkpoints; final/ loads anywhere
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-0000008", "checkpoint-0000009"]
    assert load_model(tmp_path / "b" / "final", device="cpu").fingerprint == c.fingerprint
    meta = json.loads((tmp_path / "b" / "final" / "ccclip.json").read_text())
    assert meta["training"]["data_fingerprint"] == ra.data_fingerprint and meta["training"]["step"] == 9
    assert meta["training"]["hardware"]["device"] == "cpu"
    # the LambdaLR schedule is saved with the optimizer and resumes where it stopped
    assert state["scheduler"]["last_epoch"] == 5
    assert [h["lr"] for h in ra.history] == [cfg.lr_at(s, 9) for s in range(9)]
    assert [h["lr"] for h in rc.history] == [h["lr"] for h in ra.history]


def test_resume_from_a_checkpoint_without_saved_schedule(tiny_arch, shape_posts, tmp_path, monkeypatch):
    """Checkpoints written before the LambdaLR state was saved resume at the schedule's step, exactly."""
    from ccclip_widgets.train import checkpoint as ckpt

    cfg = _cfg(max_steps=6, batch_size=8, warmup_steps=2, checkpoint_every_steps=3, min_lr_ratio=0.1)
    a = _fresh(tiny_arch)
    ra = fine_tune(a, shape_posts, cfg)
    real = ckpt.trainer_state
    monkeypatch.setattr(
        ckpt, "trainer_state", lambda **kw: {k: v for k, v in real(**kw).items() if k != "scheduler"}
    )
    stop = threading.Event()
    fine_tune(
        _fresh(tiny_arch),
        shape_posts,
        cfg,
        out_dir=tmp_path,
        stop_event=stop,
        on_step=lambda i: i.step == 3 and stop.set(),
    )
    monkeypatch.setattr(ckpt, "trainer_state", real)
    assert "scheduler" not in load_trainer_state(tmp_path / "checkpoint-0000003")
    c = _fresh(tiny_arch)
    rc = fine_tune(c, shape_posts, cfg, resume_from=tmp_path)
    assert [h["lr"] for h in rc.history] == [h["lr"] for h in ra.history]
    assert not _changed(_state(a), _state(c))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_of_every_step_is_the_configs_lr_at(tiny_arch, shape_posts, schedule):
    cfg = _cfg(max_steps=6, batch_size=8, warmup_steps=2, schedule=schedule, min_lr_ratio=0.1)
    lrs: list[float] = []
    result = fine_tune(_fresh(tiny_arch), shape_posts, cfg, on_step=lambda i: lrs.append(i.lr))
    assert lrs == [cfg.lr_at(s, 6) for s in range(6)]
    assert [h["lr"] for h in result.history] == lrs


def test_resume_refuses_other_posts_and_other_trainable_sets(tiny_arch, shape_posts, tmp_path):
    cfg = _cfg(max_steps=1, batch_size=8)
    fine_tune(_fresh(tiny_arch), shape_posts, cfg, out_dir=tmp_path)
    with pytest.raises(ValueError, match="other posts"):
        fine_tune(_fresh(tiny_arch), shape_posts.head(20), cfg, resume_from=tmp_path)
    with pytest.raises(ValueError, match="lock_image"):
        fine_tune(
            _fresh(tiny_arch),
            shape_posts,
            _cfg(max_steps=1, batch_size=8, lock_image=True),
            resume_from=tmp_path,
        )
    with pytest.raises(FileNotFoundError, match="No resumable checkpoint"):
        fine_tune(_fresh(tiny_arch), shape_posts, cfg, resume_from=tmp_path / "nothing")


def test_checkpoints_load_with_weights_only_and_are_atomic(tiny_model, shape_posts, tmp_path):
    fine_tune(
        tiny_model, shape_posts, _cfg(max_steps=2, batch_size=8, checkpoint_every_steps=1), out_dir=tmp_path
    )
    folder = tmp_path / "checkpoint-0000002"
    assert (folder / TRAINER_STATE).is_file() and (folder / "open_clip_model.safetensors").is_file()
    torch.load(folder / TRAINER_STATE, weights_only=True)  # nothing but plain containers and tensors
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert load_model(folder, device="cpu").fingerprint == tiny_model.fingerprint


# ------------------------------------------------------------------------------------------------ LoRA
def _base_key(key: str) -> str:
    return (
        key.replace(".base_layer", "")
        .replace(".parametrizations.in_proj_weight.original", ".in_proj_weight")
        .replace(".parametrizations.weight.original", ".weight")
    )


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(tiny_model, shape_posts, tmp_path):
    base = copy.deepcopy(tiny_model)
    before = _state(tiny_model)
    cfg = _cfg(max_steps=3, batch_size=8, lora=LoraSettings(r=4, merge_at_end=False))
    result = fine_tune(tiny_model, shape_posts, cfg, out_dir=tmp_path)
    after = tiny_model.model.state_dict()
    adapters = [k for k in after if ".lora_" in k]
    assert adapters and all("lora_A" in k or "lora_B" in k for k in adapters)
    for key, value in after.items():
        if ".lora_" in key:
            continue
        base_key = _base_key(key)
        if base_key == "logit_scale":
            continue
        assert torch.equal(value, before[base_key]), f"base weight {base_key} changed"
    assert any(after[k].abs().sum() > 0 for k in adapters if "lora_B" in k)
    n_adapter = sum(after[k].numel() for k in adapters)
    assert result.trainable_params["total"] == n_adapter + 1  # adapters + temperature

    final = result.final_dir
    assert (final / "adapter_model.safetensors").is_file() and not (final / "ccclip.json").exists()
    merged = merge_lora(base, final)
    probe = tiny_model.tokenize(["a red square", "a blue circle"])
    with torch.no_grad():
        torch.testing.assert_close(merged.model.encode_text(probe), tiny_model.model.encode_text(probe))
    from ccclip_widgets.models import save_checkpoint

    folder = save_checkpoint(merged, tmp_path / "merged")
    loaded = load_model(folder, device="cpu")
    assert loaded.fingerprint == merged.fingerprint
    with pytest.raises(ValueError, match="fingerprint"):
        merge_lora(tiny_model, final)  # not the base it was trained on


def test_lora_merge_at_end_gives_a_model_open_clip_loads(tiny_model, shape_posts, tmp_path):
    import open_clip

    cfg = _cfg(max_steps=2, batch_size=8, lora=LoraSettings(r=2, alpha=4))
    result = fine_tune(tiny_model, shape_posts, cfg, out_dir=tmp_path)
    assert not any(".lora_" in k for k in tiny_model.model.state_dict())
    assert (result.final_dir / "adapter" / "adapter_model.safetensors").is_file()
    loaded = load_model(result.final_dir, device="cpu")
    assert loaded.fingerprint == tiny_model.fingerprint
    plain = open_clip.create_model(f"local-dir:{result.final_dir}")
    torch.testing.assert_close(plain.state_dict()["visual.proj"], tiny_model.model.visual.proj.detach())
    # the checkpoints hold only the adapters (small)
    ckpt = list_checkpoints(tmp_path)[-1]
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 200_000


def test_lora_dropout_on_fused_attention_is_refused_clearly(tiny_model, shape_posts):
    with pytest.raises(ValueError, match="dropout"):
        fine_tune(tiny_model, shape_posts, _cfg(max_steps=1, batch_size=8, lora=LoraSettings(dropout=0.1)))
    assert not any(".lora_" in k for k in tiny_model.model.state_dict()), "adapters removed after the failure"


# ------------------------------------------------------------------------------------------------ evaluation
def test_early_stopping_keeps_and_restores_the_best(tiny_model, shape_posts, tmp_path):
    before = _state(tiny_model)
    metric = "text_to_image/descriptive/r_at_10"
    cfg = _cfg(
        epochs=5,
        batch_size=8,
        lr=1e-9,
        eval_at_start=True,
        early_stopping_metric=metric,
        early_stopping_patience=1,
    )
    seen = []
    result = fine_tune(
        tiny_model, shape_posts, cfg, eval_posts=shape_posts, out_dir=tmp_path, on_eval=seen.append
    )
    assert result.stopped == "early_stopping" and result.steps == 3 and result.best_step == 0
    assert seen[0].is_best and not seen[-1].is_best and seen[0].best_value == result.best_metric
    assert not _changed(before, _state(tiny_model)), "the best (initial) weights were not restored"
    assert result.final_metrics[metric] == seen[0].metrics[metric]
    assert load_model(tmp_path / "best", device="cpu").fingerprint == tiny_model.fingerprint
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "early_stopping" and run["best"]["step"] == 0
    with pytest.raises(ValueError, match="not among the evaluation metrics"):
        fine_tune(
            tiny_model,
            shape_posts,
            _cfg(max_steps=1, batch_size=8, early_stopping_metric="text_to_image/x/r_at_1"),
            eval_posts=shape_posts,
        )


def test_shared_images_and_languages_are_grouped(tiny_model, tmp_path):
    from ccclip_testkit import make_shape_posts

    recs = make_shape_posts(tmp_path / "imgs")[:8]
    extra = [
        {
            **r,
            "post_id": f"c{i}",
            "text": f"lol look at this {i}",
            "caption_kind": "commentative",
            "lang": "de",
        }
        for i, r in enumerate(recs[:4])
    ]
    posts = posts_from_records(recs + extra, image_root=tmp_path / "imgs")
    evals = []
    fine_tune(
        tiny_model,
        posts,
        _cfg(max_steps=1, batch_size=6, eval_at_start=True),
        eval_posts=posts,
        on_eval=evals.append,
    )
    m = evals[0].metrics
    assert m["text_to_image/all/n_queries"] == 12 and m["image_to_text/all/n_queries"] == 8
    assert m["text_to_image/commentative/n_queries"] == 4 and "text_to_image/commentative,lang=de/r_at_1" in m


# ------------------------------------------------------------------------------------------------ guards
def test_nan_loss_stops_and_the_last_good_checkpoint_survives(tiny_model, shape_posts, tmp_path, monkeypatch):
    from ccclip_widgets.train import loss as loss_module

    real = loss_module.ClipLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(loss_module.ClipLoss, "forward", poisoned)
    cfg = _cfg(max_steps=8, batch_size=8, checkpoint_every_steps=2)
    with pytest.raises(TrainingDivergedError, match="step 5") as info:
        fine_tune(tiny_model, shape_posts, cfg, out_dir=tmp_path)
    err = info.value
    assert err.step == 5 and err.last_good_checkpoint == tmp_path / "checkpoint-0000004"
    assert str(err.last_good_checkpoint) in str(err)
    assert load_model(err.last_good_checkpoint, device="cpu").name == tiny_model.name
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "diverged"
    assert not (tmp_path / "checkpoint-0000005").exists() and not (tmp_path / "final").exists()

    calls["n"] = 0
    with pytest.warns(RuntimeWarning, match="step skipped"):
        result = fine_tune(tiny_model, shape_posts, _cfg(max_steps=6, batch_size=8, max_nan_tolerance=1))
    assert result.steps == 6 and [h["skipped"] for h in result.history].count(True) == 1


def test_batch_larger_than_the_data_is_shrunk_with_a_warning(tiny_model, shape_posts):
    with pytest.warns(
        UserWarning, match=r"batch_size=64 is larger than the 24 usable training posts; using batch_size=24"
    ):
        result = fine_tune(tiny_model, shape_posts, _cfg(max_steps=1, batch_size=64))
    assert result.batch_size == 24 and result.steps == 1


def test_too_few_posts_and_empty_texts_are_refused(tiny_model, shape_posts):
    with pytest.raises(ValueError, match=r"at least 2 usable training posts .*; got 1"):
        fine_tune(tiny_model, shape_posts.head(1), _cfg(max_steps=1, batch_size=2))
    table = shape_posts.table.with_columns(
        pl.when(pl.col("post_id") == "p0003").then(pl.lit("  ")).otherwise(pl.col("text")).alias("text")
    )
    with pytest.raises(
        ValueError, match=r"1 training post\(s\) have an empty text \(e.g. post_id \['p0003'\]\)"
    ):
        fine_tune(tiny_model, Posts(table=table), _cfg(max_steps=1, batch_size=8))


def test_undecodable_images_are_skipped_and_reported(tiny_model, shape_posts):
    paths = shape_posts.table["image_path"].to_list()
    data = Path(paths[2]).read_bytes()
    Path(paths[2]).write_bytes(data[: len(data) // 2])  # truncated: passes the header check, fails to decode
    with pytest.warns(UserWarning, match="1 training post"):
        result = fine_tune(tiny_model, shape_posts, _cfg(epochs=1, batch_size=24))
    assert result.skipped["post_id"].to_list() == ["p0002"]
    assert result.skipped["reason"][0] in ("truncated", "corrupt")
    assert result.steps == 1 and all(h["loss"] == h["loss"] for h in result.history)


def test_out_of_memory_is_reraised_with_hints(tiny_model, shape_posts, monkeypatch):
    from ccclip_widgets.train import step

    def boom(self, images, texts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step._DualEncoder, "forward", boom)
    with pytest.raises(TrainingOutOfMemoryError, match="smaller batch_size") as info:
        fine_tune(tiny_model, shape_posts, _cfg(max_steps=1, batch_size=8))
    assert "grad_checkpointing=True" in str(info.value) and "grad_accum_steps" in str(info.value)
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)


def test_fp16_on_cpu_is_refused(tiny_model, shape_posts):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        fine_tune(tiny_model, shape_posts, _cfg(max_steps=1, batch_size=8, precision="fp16"))


def test_gradient_accumulation_and_bf16_autocast_run(tiny_model, shape_posts):
    steps = []
    result = fine_tune(
        tiny_model,
        shape_posts,
        _cfg(epochs=1, batch_size=4, grad_accum_steps=4, precision="bf16", grad_checkpointing=True),
        on_step=steps.append,
    )
    # 6 batches per epoch, 4 per step: one full step and one of the 2 left over
    assert result.steps == 2 and [s.step for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)


def test_empty_eval_posts_and_early_stopping_without_them_warn(tiny_model, shape_posts):
    cfg = _cfg(max_steps=1, batch_size=8, early_stopping_metric="text_to_image/all/r_at_1")
    with pytest.warns(UserWarning, match="early stopping is off"):
        fine_tune(tiny_model, shape_posts, cfg)
    empty = shape_posts.filter(pl.col("post_id") == "none")
    with pytest.warns(UserWarning, match="no usable post"):
        result = fine_tune(tiny_model, shape_posts, _cfg(max_steps=1, batch_size=8), eval_posts=empty)
    assert result.eval_history == [] and result.final_metrics == {}


# ------------------------------------------------------------------------------------------------ deferred host reads
def _fused_adamw(monkeypatch):
    """Make the trainer build fused AdamW on the CPU too: the path a GPU takes (non-finite steps skipped on device)."""
    from ccclip_widgets.train import loop

    real = loop._Trainer._optimizer

    def fused(self, lr):
        opt = real(self, lr)
        d = opt.defaults
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], fused=True)

    monkeypatch.setattr(loop._Trainer, "_optimizer", fused)


def _poison_loss_call(monkeypatch, at: int) -> dict:
    from ccclip_widgets.train import loss as loss_module

    real = loss_module.ClipLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == at else out

    monkeypatch.setattr(loss_module.ClipLoss, "forward", poisoned)
    return calls


def test_reading_every_n_steps_gives_the_per_step_run(tiny_arch, shape_posts, monkeypatch):
    _fused_adamw(monkeypatch)
    calls = _poison_loss_call(monkeypatch, at=5)
    runs = {}
    seen: dict[int, list[int]] = {}
    for every in (1, 4):
        calls["n"] = 0
        clip = _fresh(tiny_arch)
        seen[every] = []
        cfg = _cfg(max_steps=9, batch_size=8, max_nan_tolerance=1, read_every_steps=every)
        with pytest.warns(RuntimeWarning, match="step 5; step skipped"):
            result = fine_tune(clip, shape_posts, cfg, on_step=lambda i, e=every: seen[e].append(i.step))
        runs[every] = (result, _state(clip))
    (a, wa), (b, wb) = runs[1], runs[4]
    assert seen[1] == seen[4] == list(range(1, 10))  # every step reported once, in order (in bursts of 4)
    assert [h["skipped"] for h in b.history] == [s == 5 for s in range(1, 10)]
    assert [h["loss"] for h in a.history][:4] == [h["loss"] for h in b.history][:4]
    for k in wa:
        assert torch.isfinite(wb[k]).all(), k  # the poisoned step never reached the weights
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_divergence_found_at_a_later_read_names_the_bad_step(tiny_arch, shape_posts, monkeypatch, tmp_path):
    _fused_adamw(monkeypatch)
    _poison_loss_call(monkeypatch, at=5)
    clip = _fresh(tiny_arch)
    cfg = _cfg(max_steps=12, batch_size=8, read_every_steps=4, checkpoint_every_steps=4)
    with pytest.raises(TrainingDivergedError, match="step 5") as info:
        fine_tune(clip, shape_posts, cfg, out_dir=tmp_path)
    assert info.value.step == 5 and info.value.last_good_checkpoint == tmp_path / "checkpoint-0000004"
    assert all(torch.isfinite(v).all() for v in clip.model.state_dict().values())


def test_uint8_pixels_normalised_on_the_device_equal_worker_normalised_ones(shape_posts, tiny_model):
    from ccclip_widgets.train.data import PairDataset, prepare_posts

    data = prepare_posts(shape_posts, tiny_model)
    args = (data.sources, tiny_model.image_size, tiny_model.preprocess, tiny_model.preprocess_cfg)
    floats = PairDataset(*args, augment=True, seed=3)
    raw = PairDataset(*args, augment=True, seed=3, normalize=False)
    x = raw[(2, 1)][1]
    assert x.dtype == torch.uint8
    got = raw.device_normaliser(torch.device("cpu"))(torch.stack([x]))[0]
    torch.testing.assert_close(got, floats[(2, 1)][1], rtol=0, atol=1e-6)
    assert PairDataset(*args, augment=False, seed=3, normalize=False)[(2, 1)][1].dtype == torch.float32
