"""Fault injection, part two: damaged files (a flipped byte, a cut-off file) and a full disk.

Every store part, index file, projection cache entry, checkpoint file and final model is damaged in turn: it
must be reported (a warning naming the file, or an error naming it and what to do), set aside or refused, and
recomputed or resumed from the previous good checkpoint with nothing lost. A disk that fills up while saving
must raise DiskFullError and leave what was there readable. Part one (kills, concurrent writers) is
tests/test_reliability.py; both count their cases into the session summary of tests/conftest.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ccclip_widgets._io import CacheCorruptionWarning, DiskFullError
from ccclip_widgets.embed import embed_posts
from ccclip_widgets.models import CheckpointIntegrityError, load_model, save_checkpoint
from ccclip_widgets.neighbors import IndexIntegrityError, NeighborIndex
from ccclip_widgets.posts import read_posts
from ccclip_widgets.projection import cached_projection
from ccclip_widgets.store import EmbeddingStore, StoreCorruptionWarning
from ccclip_widgets.train import FineTuneConfig, fine_tune
from ccclip_widgets.train.checkpoint import CheckpointCorruptionWarning, list_checkpoints


# ------------------------------------------------------------------------------------------------- damage
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


DAMAGE = ("flip", "truncate")
#: 24 shape posts are stored as three image parts of 8 vectors.
PARTS_OF_8 = {"part_size": 8, "batch_size": 8, "num_workers": 0, "show_progress": False}


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_store_part_is_reported_and_recomputed(tiny_model, shape_posts, tmp_path, how, summary):
    ref = embed_posts(shape_posts, tiny_model, store=tmp_path / "ref", **PARTS_OF_8)
    embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **PARTS_OF_8)
    part = sorted((tmp_path / "s").rglob("images/part-*.parquet"))[1]
    _damage(part, how)
    with pytest.warns(StoreCorruptionWarning, match=part.name):
        again = embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **PARTS_OF_8)
    assert again.stats["images_encoded"] == 8 and again.stats["images_reused"] == 16
    assert len(again) == len(ref) == 24
    np.testing.assert_array_equal(again.image, ref.image)
    assert part.with_name(part.name + ".corrupt").exists()
    summary["damage:store"]["cases"] += 1
    summary["damage:store"]["detected"] += 1
    summary["damage:store"]["rows_lost"] += len(ref) - len(again)


def test_damaged_store_manifest_is_reported_and_rewritten(tmp_path, summary):
    EmbeddingStore.open(tmp_path, "fp", 8).write_part("texts", ["t"], np.ones((1, 8), np.float32))
    manifest = tmp_path / "fp" / "manifest.json"
    _damage(manifest, "truncate")
    with pytest.warns(StoreCorruptionWarning, match="manifest.json is damaged"):
        store = EmbeddingStore.open(tmp_path, "fp", 8)
    assert store.has("texts", ["t"]).all() and json.loads(manifest.read_text())["dim"] == 8
    summary["damage:store"]["cases"] += 1
    summary["damage:store"]["detected"] += 1


def _small_index_data() -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return [f"p{i}" for i in range(60)], rng.normal(size=(60, 8)), rng.normal(size=(60, 8))


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["image.faiss", "text.faiss", "posts.parquet", "manifest.json"])
def test_damaged_index_file_is_refused_then_rebuilt(tmp_path, name, how, summary):
    ids, img, txt = _small_index_data()
    built = NeighborIndex.load_or_build(tmp_path, ids, img, txt, fingerprint="f", show_progress=False)
    _damage(tmp_path / name, how)
    with pytest.raises(IndexIntegrityError, match=name.replace(".", r"\.")):
        NeighborIndex.load(tmp_path, fingerprint="f")
    with pytest.warns(CacheCorruptionWarning, match="is damaged and is rebuilt"):
        again = NeighborIndex.load_or_build(tmp_path, ids, img, txt, fingerprint="f", show_progress=False)
    for row in (0, 30):
        assert again.image_to_texts(row).equals(built.image_to_texts(row))
    assert NeighborIndex.load(tmp_path, fingerprint="f").n == 60  # the rebuilt one was saved
    summary["damage:index"]["cases"] += 1
    summary["damage:index"]["detected"] += 1


def test_altered_but_valid_index_manifest_is_caught(tmp_path, summary):
    ids, img, txt = _small_index_data()
    NeighborIndex.build(ids, img, txt, show_progress=False).save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["params"]["seed"] = 1  # still valid JSON, still the right files
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexIntegrityError, match="was altered"):
        NeighborIndex.load(tmp_path)
    summary["damage:index"]["cases"] += 1
    summary["damage:index"]["detected"] += 1


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_damaged_projection_cache_is_reported_and_recomputed(tmp_path, suffix, how, summary):
    xy = np.random.default_rng(5).normal(size=(40, 2)).astype(np.float32)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return xy

    first = cached_projection(tmp_path, "fp", {"a": 1}, compute)
    (path,) = tmp_path.glob(f"umap-*{suffix}")
    _damage(path, how)
    with pytest.warns(CacheCorruptionWarning, match=path.name):
        again = cached_projection(tmp_path, "fp", {"a": 1}, compute)
    assert len(calls) == 2
    np.testing.assert_array_equal(again, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        np.testing.assert_array_equal(cached_projection(tmp_path, "fp", {"a": 1}, compute), first)
    assert len(calls) == 2
    summary["damage:projection"]["cases"] += 1
    summary["damage:projection"]["detected"] += 1


FAST_TRAIN = {
    "epochs": 3,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 1,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 3,
    "eval_at_start": False,
    "show_progress": False,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_arch, inputs):
    """An uninterrupted run's final weights, and a run stopped after step 6 (checkpoints 2, 4, 6)."""
    posts = read_posts(inputs / "posts-train.csv", image_root=inputs / "imgs")
    root = tmp_path_factory.mktemp("stopped-run")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = fine_tune(load_model(inputs / "model", device="cpu"), posts, FineTuneConfig(**FAST_TRAIN))
        reference = {k: v.detach().clone() for k, v in full.model.model.state_dict().items()}
        stop = threading.Event()
        fine_tune(
            load_model(inputs / "model", device="cpu"),
            posts,
            FineTuneConfig(**FAST_TRAIN),
            out_dir=root / "run",
            stop_event=stop,
            on_step=lambda info: info.step == 6 and stop.set(),
        )
    finally:
        torch.set_num_threads(n)
    assert [p.name for p in list_checkpoints(root / "run")][-1] == "checkpoint-0000006"
    return posts, reference, root / "run"


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["open_clip_model.safetensors", "trainer_state.pt", "ccclip.json"])
def test_damaged_checkpoint_is_refused_or_skipped_for_the_previous_one(
    stopped_run, inputs, tmp_path, name, how, summary
):
    posts, reference, run = stopped_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    newest = run / "checkpoint-0000006"
    _damage(newest / name, how)
    cfg = FineTuneConfig(**FAST_TRAIN)
    # named explicitly: refused, naming the file and the previous good checkpoint
    with pytest.raises(
        CheckpointIntegrityError, match=r"(?s)" + name.replace(".", r"\.") + r".*checkpoint-0000004"
    ):
        fine_tune(load_model(inputs / "model", device="cpu"), posts, cfg, resume_from=newest)
    # the run folder: skipped with a warning, set aside, resumed exactly from checkpoint 4
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.warns(CheckpointCorruptionWarning, match=r"Resuming from checkpoint-0000004"):
            result = fine_tune(load_model(inputs / "model", device="cpu"), posts, cfg, resume_from=run)
    finally:
        torch.set_num_threads(n)
    assert result.steps == 9 and (run / "checkpoint-0000006.corrupt").is_dir()
    state = result.model.model.state_dict()
    assert [k for k in reference if not torch.equal(reference[k], state[k])] == []
    summary["damage:checkpoint"]["cases"] += 1
    summary["damage:checkpoint"]["detected"] += 1
    summary["damage:checkpoint"]["resumed_from_previous"] += 1


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_final_model_is_refused_by_load_model(stopped_run, inputs, tmp_path, how, summary):
    folder = save_checkpoint(load_model(inputs / "model", device="cpu"), tmp_path / "final")
    _damage(folder / "open_clip_model.safetensors", how)
    with pytest.raises(CheckpointIntegrityError, match=r"open_clip_model\.safetensors is damaged"):
        load_model(folder, device="cpu")
    summary["damage:checkpoint"]["cases"] += 1
    summary["damage:checkpoint"]["detected"] += 1


# ------------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def disk_full(monkeypatch):
    """Make ``fsync`` report ENOSPC for files whose path contains ``state['match']`` from the n-th one on."""
    state = {"match": None, "after": 0, "seen": 0, "raised": 0}
    real = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        if state["match"] is not None and state["match"] in path:
            state["seen"] += 1
            if state["seen"] > state["after"]:
                state["raised"] += 1
                raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return state


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being synced")
def test_disk_full_while_embedding_keeps_the_store_readable(
    tiny_model, shape_posts, tmp_path, disk_full, summary
):
    ref = embed_posts(shape_posts, tiny_model, store=tmp_path / "ref", **PARTS_OF_8)
    disk_full.update(match=f"{os.sep}images{os.sep}", after=2)  # the third image part finds the disk full
    with pytest.raises(DiskFullError, match=r"(?s)No space left.*images.*free some disk space"):
        embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **PARTS_OF_8)
    assert disk_full["raised"] == 1
    leftovers = [p for p in (tmp_path / "s").rglob(".*") if p.name.endswith(".tmp")]
    assert leftovers == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreCorruptionWarning)
        store = EmbeddingStore.open(tmp_path / "s", tiny_model.fingerprint, tiny_model.embed_dim)
        assert store.count("images") == 16 and store.count("texts") == 24  # every earlier part reads back
    disk_full["match"] = None  # space was freed
    again = embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **PARTS_OF_8)
    assert again.stats["images_reused"] == 16 and again.stats["images_encoded"] == 8
    np.testing.assert_array_equal(again.image, ref.image)
    summary["disk_full"]["cases"] += 1
    summary["disk_full"]["rows_lost"] += len(ref) - len(again)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the file being synced")
def test_disk_full_while_saving_index_projection_and_checkpoint(
    stopped_run, inputs, tmp_path, disk_full, summary
):
    ids, img, txt = _small_index_data()
    old = NeighborIndex.build(ids, img, txt, fingerprint="old", show_progress=False).save(tmp_path / "idx")
    new = NeighborIndex.build(ids, txt, img, fingerprint="new", show_progress=False)
    disk_full.update(match="text.faiss", after=0)
    with pytest.raises(DiskFullError, match=r"text\.faiss.*is unchanged"):
        new.save(tmp_path / "idx")
    assert NeighborIndex.load(old, fingerprint="old").n == 60  # the previous index is intact
    assert not list((tmp_path / "idx").glob(".*.tmp"))

    disk_full.update(match="umap-", after=0, seen=0)
    with pytest.raises(DiskFullError, match=r"umap-[0-9a-f]+\.npy"):
        cached_projection(tmp_path / "proj", "fp", {}, lambda: np.zeros((5, 2), np.float32))
    assert sorted(p.suffix for p in (tmp_path / "proj").iterdir()) == [".lock"]

    posts, reference, run = stopped_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    for p in list_checkpoints(run)[1:]:
        shutil.rmtree(p)  # only checkpoint 2 is left: the resumed run writes 4 next
    disk_full.update(match="checkpoint-0000004", after=0, seen=0)
    cfg = FineTuneConfig(**FAST_TRAIN)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(DiskFullError, match="checkpoint-0000004"):
            fine_tune(load_model(inputs / "model", device="cpu"), posts, cfg, resume_from=run)
        assert [p.name for p in list_checkpoints(run)] == ["checkpoint-0000002"]
        assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
        disk_full["match"] = None
        result = fine_tune(load_model(inputs / "model", device="cpu"), posts, cfg, resume_from=run)
    finally:
        torch.set_num_threads(n)
    state = result.model.model.state_dict()
    assert [k for k in reference if not torch.equal(reference[k], state[k])] == []
    summary["disk_full"]["cases"] += 3
