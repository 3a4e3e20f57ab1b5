"""Fault injection, part one: SIGKILL at seeded random points, and concurrent writers.

The kill tests run each stage (embedding + compaction, neighbor index build/save, projection cache, fine-tuning)
in a process of its own (forked by tests/reliability_worker.py, which imports torch once) that SIGKILLs itself at
the N-th I/O event of the toolkit (every rename, fsync, unlink, mkdir, rmtree and lock acquisition; see the
worker's docstring), N drawn from a seeded generator. Each killed run is followed by another run of the same stage on the same folder (itself possibly
killed), until the stage completes; the completed result must equal an uninterrupted run's, and no kill may ever
produce a file that is later reported as damaged. Part two, damaged files and a full disk, is
tests/test_reliability_storage.py.

The counts of every case (both parts) are collected in a session-wide summary (the ``summary`` fixture of
tests/conftest.py) written to ``<pytest base temp>/reliability_summary.json`` (or
``$CCCLIP_RELIABILITY_SUMMARY``); docs/reliability.md quotes them. ``$CCCLIP_RELIABILITY_SEED`` changes the kill
points (default 20260).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from ccclip_testkit import RELIABILITY_SEED

from ccclip_widgets.embed import embed_posts
from ccclip_widgets.models import load_model
from ccclip_widgets.neighbors import NeighborIndex
from ccclip_widgets.posts import read_posts
from ccclip_widgets.projection import cached_projection
from ccclip_widgets.store import EmbeddingStore, StoreCorruptionWarning
from ccclip_widgets.train import FineTuneConfig, fine_tune

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "reliability_worker.py"
SEED = RELIABILITY_SEED  # also recorded by the session summary (tests/conftest.py)
#: Kills per stage (each followed by a resumed run).
KILLS = {"embed": 5, "index": 5, "projection": 3, "finetune": 5}
#: At most this many kills in a row on one folder before letting a run complete.
CHAIN_KILLS = 3
#: A run of a stage must finish within this (it takes seconds); only a bound against hangs, never asserted on.
RUN_LIMIT_S = 300


# ------------------------------------------------------------------------------------------------- worker
def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        # umap-learn's numba kernels would be compiled afresh in every run (about 7 s); the projection cache's crash
        # safety does not depend on them, and every run (reference and resumed) takes the same pure-Python path.
        "NUMBA_DISABLE_JIT": "1",
    }


class Worker:
    """The worker in ``--serve`` mode: it imports torch and open_clip once and forks a process for every run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(folder / "worker.err", "w"),
            env=_env(),
            text=True,
        )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the worker died: {(self.folder / 'worker.err').read_text()[-3000:]}")
        return json.loads(line)

    def start(
        self, stage: str, inputs: Path, work: Path, kill_at: int = -1, role: str = "first"
    ) -> tuple[int, Path]:
        """Fork one run; returns its pid and the file its output goes to."""
        self.count += 1
        log = self.folder / f"run{self.count:03d}-{stage}.log"
        request = {
            "op": "start",
            "stage": stage,
            "inputs": str(inputs),
            "work": str(work),
            "kill_at": kill_at,
        }
        reply = self._ask({**request, "role": role, "log": str(log)})
        return reply["pid"], log

    def wait(self, pid: int, log: Path) -> Any:
        """Wait for a run: its exit code (-9 when SIGKILLed) and its output."""
        reply = self._ask({"op": "wait", "pid": pid, "timeout": RUN_LIMIT_S})
        return SimpleNamespace(returncode=reply["returncode"], stderr=log.read_text())

    def run(self, stage: str, inputs: Path, work: Path, kill_at: int = -1) -> Any:
        return self.wait(*self.start(stage, inputs, work, kill_at))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(RUN_LIMIT_S)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    w = Worker(tmp_path_factory.mktemp("worker"))
    yield w
    w.close()


def _result(work: Path, stage: str) -> dict[str, Any]:
    return json.loads((work / f"result-{stage}.json").read_text())


def kill_chains(
    stage: str, inputs: Path, base: Path, summary: dict, worker: Worker
) -> tuple[dict[str, Any], list[Path]]:
    """Run ``stage`` uninterrupted, then kill it KILLS[stage] times at seeded random events, resuming each time.

    Returns the reference result and the work folders of the completed chains. A chain is a sequence of runs on
    one folder: up to CHAIN_KILLS runs each killed at a random event, then a run that completes (a run may also
    complete early, when it has fewer events left than its kill point). The first kill of a chain is drawn from
    all the events of an uninterrupted run; the later ones from an estimate of what is left, so that the kills of
    a chain reach ever later parts of the work.
    """
    rng = np.random.default_rng([SEED, sorted(KILLS).index(stage)])
    ref = worker.run(stage, inputs, base / "reference")
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _result(base / "reference", stage)
    assert reference["corruption_warnings"] == []
    n_events = reference["events"]
    assert n_events >= 8, f"{stage}: too few I/O events ({n_events}) to inject faults into"
    stats = summary[f"kill:{stage}"]
    stats["events_in_a_run"] = n_events
    chains: list[Path] = []
    kills = 0
    while kills < KILLS[stage]:
        work = base / f"chain{len(chains)}"
        left = n_events
        completed = False
        for _ in range(CHAIN_KILLS):
            if kills == KILLS[stage]:
                break
            kill_at = int(rng.integers(1, left + 1))
            proc = worker.run(stage, inputs, work, kill_at)
            if proc.returncode != -9:
                assert proc.returncode == 0, f"{stage}: the run after a kill failed:\n{proc.stderr[-3000:]}"
                stats["runs_completed_before_kill_point"] += 1
                completed = True
                break
            assert f"KILLED at event {kill_at}" in proc.stderr, proc.stderr[-2000:]
            kills += 1
            stats["kills"] += 1
            stats.setdefault("kill_events", []).append(proc.stderr.strip().splitlines()[-1][7:])
            left = max(12, left - kill_at + 4)  # a resumed run starts with a few events of its own
        if not completed:
            proc = worker.run(stage, inputs, work)  # resume to the end
            assert proc.returncode == 0, f"{stage}: the final resumed run failed:\n{proc.stderr[-3000:]}"
        chains.append(work)
    for folder in chains:
        got = _result(folder, stage)
        assert got["corruption_warnings"] == [], (
            f"{stage}: a kill left a damaged file: {got['corruption_warnings']}"
        )
        leftovers = [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]
        assert leftovers == [], f"{stage}: temporary files left after the resumed run: {leftovers}"
    stats["chains"] += len(chains)
    stats["cases"] += len(chains)
    return reference, chains


# ------------------------------------------------------------------------------------------------- kills
def _store_vectors(root: Path, model: Any, posts: Any) -> tuple[np.ndarray, np.ndarray, int]:
    store = EmbeddingStore.open(root, model.fingerprint, model.embed_dim)
    img = store.get("images", posts.table["image_key"].to_list())
    txt = store.get("texts", posts.table["text_key"].to_list())
    rows = sum(len(pl.read_parquet(p)) for k in ("images", "texts") for p in store.parts(k))
    return img, txt, rows


@pytest.mark.slow
def test_sigkill_during_embedding_and_compaction(inputs, tmp_path, summary, worker):
    reference, chains = kill_chains("embed", inputs, tmp_path, summary, worker)
    assert reference["stats"]["images_encoded"] == 48 and reference["posts"] == 48
    posts = read_posts(inputs / "posts.csv", image_root=inputs / "imgs")
    model = load_model(inputs / "model", device="cpu")
    ref_img, ref_txt, ref_rows = _store_vectors(tmp_path / "reference" / "store", model, posts)
    assert ref_rows == 48 + 24  # compacted: one row per distinct image and text
    for folder in chains:
        got = _result(folder, "embed")
        assert got["posts"] == 48, "posts lost"
        img, txt, rows = _store_vectors(folder / "store", model, posts)
        np.testing.assert_array_equal(img, ref_img)
        np.testing.assert_array_equal(txt, ref_txt)
        assert rows == ref_rows, "the store holds duplicates or lost rows"
        summary["kill:embed"]["rows_lost"] += 48 - got["posts"]
    # the runs after a kill reused the parts finished before it
    assert any(_result(f, "embed")["stats"]["images_reused"] > 0 for f in chains)


@pytest.mark.slow
def test_sigkill_during_index_build_and_save(inputs, tmp_path, summary, worker):
    reference, chains = kill_chains("index", inputs, tmp_path, summary, worker)
    ref = NeighborIndex.load(tmp_path / "reference" / "index", fingerprint="vectors-1")
    ref_files = json.loads((tmp_path / "reference" / "index" / "manifest.json").read_text())["files"]
    for folder in chains:
        got = NeighborIndex.load(folder / "index", fingerprint="vectors-1")
        assert got.n == ref.n == 120
        assert json.loads((folder / "index" / "manifest.json").read_text())["files"] == ref_files
        for row in (0, 17, 119):
            assert got.image_to_texts(row).equals(ref.image_to_texts(row))
            assert got.text_to_images(row).equals(ref.text_to_images(row))
            assert got.image_to_images(row).equals(ref.image_to_images(row))
        summary["kill:index"]["rows_lost"] += ref.n - got.n


@pytest.mark.slow
def test_sigkill_during_projection_cache(inputs, tmp_path, summary, worker):
    reference, chains = kill_chains("projection", inputs, tmp_path, summary, worker)
    assert reference["shape"] == [120, 2]

    def read(folder: Path) -> np.ndarray:
        (npy,) = (folder / "proj").glob("umap-*.npy")
        return np.load(npy)

    ref = read(tmp_path / "reference")
    for folder in chains:
        got = read(folder)
        np.testing.assert_array_equal(got, ref)
        summary["kill:projection"]["rows_lost"] += ref.shape[0] - got.shape[0]


@pytest.mark.slow
def test_sigkill_during_fine_tuning(inputs, tmp_path, summary, worker):
    from safetensors.torch import load_file

    reference, chains = kill_chains("finetune", inputs, tmp_path, summary, worker)
    assert reference["steps"] == 9
    ref = load_file(tmp_path / "reference" / "run" / "final" / "open_clip_model.safetensors")
    for folder in chains:
        final = folder / "run" / "final"
        load_model(final, device="cpu")  # verifies every checksum
        got = load_file(final / "open_clip_model.safetensors")
        assert set(got) == set(ref)
        changed = [k for k in ref if not torch.equal(ref[k], got[k])]
        assert changed == [], f"weights differ from the uninterrupted run: {changed[:5]}"
        assert json.loads((folder / "run" / "run.json").read_text())["status"] == "finished"
    assert any(_result(f, "finetune").get("resumed") for f in chains), "no chain resumed from a checkpoint"


# ------------------------------------------------------------------------------------------------- concurrency
class _Waiting(logging.Handler):
    """Sets an event when a lock wait is announced (the message a user sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Waiting for" in record.getMessage():
            self.messages.append(record.getMessage())
            self.event.set()


@pytest.fixture
def lock_waits():
    handler = _Waiting()
    logger = logging.getLogger("ccclip_widgets._lock")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _wait_for(cond, what: str, logs=lambda: "", limit: float = RUN_LIMIT_S) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{logs()}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_and_a_compaction_share_one_store(inputs, tmp_path, summary, lock_waits, worker):
    """A embeds posts 0-31 and pauses inside the store lock; B (posts 16-47) and a compaction must wait."""
    work = tmp_path / "shared"
    sync = work / "sync"
    sync.mkdir(parents=True)
    first = worker.start("embed-concurrent", inputs, work, role="first")
    second = worker.start("embed-concurrent", inputs, work, role="second")

    def logs() -> str:
        return "\n".join(log.read_text()[-2000:] for _, log in (first, second) if log.exists())

    _wait_for(lambda: (sync / "first_has_lock").exists(), "A to hold the store lock", logs)
    model = load_model(inputs / "model", device="cpu")
    store = EmbeddingStore.open(work / "store", model.fingerprint, model.embed_dim)
    compactor = threading.Thread(target=store.compact, args=("images",), kwargs={"timeout": RUN_LIMIT_S})
    compactor.start()
    _wait_for(lock_waits.event.is_set, "the compaction to wait for the lock", logs)
    _wait_for(lambda: (sync / "second_waiting").exists(), "B to wait for the lock", logs)
    # both are queued behind A, which has written one part of 8 images and holds the lock
    (sync / "release").touch()
    done_a, done_b = worker.wait(*first), worker.wait(*second)
    compactor.join(RUN_LIMIT_S)
    assert done_a.returncode == 0, done_a.stderr[-3000:]
    assert done_b.returncode == 0, done_b.stderr[-3000:]
    err_b = done_b.stderr
    assert not compactor.is_alive()
    a, b = _result(work, "embed-concurrent-first"), _result(work, "embed-concurrent-second")
    # B's message names the store's lock and the process holding it
    assert "Waiting for" in err_b and str(work / "store") in err_b and f"process {a['pid']}" in err_b
    assert f"process {a['pid']}" in lock_waits.messages[0]
    # cooperation: B encoded only the 16 images A did not have; nothing was encoded twice
    assert a["stats"]["images_encoded"] == 32 and b["stats"]["images_encoded"] == 16
    assert b["stats"]["images_reused"] == 16 and a["posts"] == 32 and b["posts"] == 32
    # the end state equals one uninterrupted run over all posts
    posts = read_posts(inputs / "posts.csv", image_root=inputs / "imgs")
    single = embed_posts(
        posts, model, store=tmp_path / "single", part_size=8, batch_size=8, show_progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreCorruptionWarning)
        img, txt, rows = _store_vectors(work / "store", model, posts)
    np.testing.assert_allclose(img, single.image, atol=1e-6)
    np.testing.assert_allclose(txt, single.text, atol=1e-6)
    assert rows == 48 + 24, "rows lost or duplicated"
    summary["concurrency"]["cases"] += 1
    summary["concurrency"]["writers"] += 2
    summary["concurrency"]["compactions"] += 1
    summary["concurrency"]["rows_lost"] += 48 + 24 - rows


def test_reader_survives_a_compaction_between_listing_and_reading(tmp_path, summary, monkeypatch):
    writer = EmbeddingStore.open(tmp_path, "fp", 4)
    v = np.eye(4, dtype=np.float32)
    for i in range(4):
        writer.write_part("images", [f"k{i}"], v[i : i + 1])
    reader = EmbeddingStore.open(tmp_path, "fp", 4)
    listed = reader.parts("images")
    calls = {"n": 0}

    def parts_then_compact(kind: str) -> list[Path]:
        calls["n"] += 1
        if calls["n"] == 1:
            EmbeddingStore.open(tmp_path, "fp", 4).compact("images")  # another process merges meanwhile
            return listed  # the stale listing
        return sorted(p for p in (tmp_path / "fp" / kind).glob("part-*.parquet"))

    monkeypatch.setattr(reader, "parts", parts_then_compact)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreCorruptionWarning)
        np.testing.assert_array_equal(reader.get("images", ["k0", "k1", "k2", "k3"]), v)
    assert calls["n"] >= 2
    summary["concurrency"]["cases"] += 1


def test_two_notebooks_build_one_projection_and_one_index(tmp_path, summary, lock_waits, monkeypatch):
    release = threading.Event()
    calls = {"umap": 0, "index": 0}
    results: dict[str, Any] = {}
    xy = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)

    def compute() -> np.ndarray:
        calls["umap"] += 1
        release.wait(RUN_LIMIT_S)  # hold the entry's lock until the other caller queues up
        return xy

    def ask(name: str) -> None:
        results[name] = cached_projection(tmp_path / "proj", "fp", {"k": 1}, compute)

    t1 = threading.Thread(target=ask, args=("a",))
    t1.start()
    _wait_for(lambda: calls["umap"] == 1, "the first computation")
    t2 = threading.Thread(target=ask, args=("b",))
    t2.start()
    _wait_for(lambda: lock_waits.event.is_set(), "the second caller to wait")
    release.set()
    t1.join(RUN_LIMIT_S)
    t2.join(RUN_LIMIT_S)
    assert calls["umap"] == 1, "the layout was computed twice"
    np.testing.assert_array_equal(results["a"], results["b"])

    lock_waits.event.clear()
    vecs = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    original = NeighborIndex.build.__func__
    gate = threading.Event()

    def build(cls, *args, **kwargs):
        calls["index"] += 1
        gate.wait(RUN_LIMIT_S)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(NeighborIndex, "build", classmethod(build))
    ids = [str(i) for i in range(50)]

    def index(name: str) -> None:
        results[name] = NeighborIndex.load_or_build(
            tmp_path / "idx", ids, vecs, fingerprint="f", show_progress=False
        )

    t1 = threading.Thread(target=index, args=("i1",))
    t1.start()
    _wait_for(lambda: calls["index"] == 1, "the first build")
    t2 = threading.Thread(target=index, args=("i2",))
    t2.start()
    _wait_for(lambda: lock_waits.event.is_set(), "the second builder to wait")
    gate.set()
    t1.join(RUN_LIMIT_S)
    t2.join(RUN_LIMIT_S)
    assert calls["index"] == 1, "the index was built twice"
    assert results["i1"].image_to_images(3).equals(results["i2"].image_to_images(3))
    summary["concurrency"]["cases"] += 2


def test_second_trainer_into_the_same_run_folder_is_refused(tiny_model, shape_posts, tmp_path, summary):
    from ccclip_widgets._lock import file_lock

    with file_lock(tmp_path / "run.lock", purpose="fine-tuning"):
        done = {}

        def other() -> None:  # another thread stands in for another process (flock is per open file)
            try:
                fine_tune(
                    tiny_model,
                    shape_posts,
                    FineTuneConfig(max_steps=1, batch_size=8, show_progress=False),
                    out_dir=tmp_path,
                )
            except RuntimeError as exc:
                done["error"] = str(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(RUN_LIMIT_S)
    assert "Another process is fine-tuning into" in done["error"] and str(tmp_path) in done["error"]
    assert not (tmp_path / "run.json").exists()  # it wrote nothing
    summary["concurrency"]["cases"] += 1


def test_lock_of_a_killed_holder_is_free_and_a_live_holder_is_named(tmp_path, summary):
    from ccclip_widgets._lock import LockTimeout, file_lock

    lock = tmp_path / "store" / ".lock"
    code = (
        "import sys, time; from ccclip_widgets._lock import file_lock\n"
        f"with file_lock({str(lock)!r}, purpose='embedding 10 posts'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match=rf"(?s)process {holder.pid} on .*embedding 10 posts"):
            with file_lock(lock, timeout=0.2):
                pass
    finally:
        holder.kill()  # SIGKILL: no chance to unlock
        holder.wait(RUN_LIMIT_S)
    assert holder.returncode == -9
    with file_lock(lock, timeout=0):  # the kernel released it with the process
        pass
    summary["concurrency"]["cases"] += 1


def test_interrupted_folder_replacement_is_put_back(tmp_path, summary):
    from ccclip_widgets._io import atomic_dir, clean_stale_temps

    with atomic_dir(tmp_path / "best") as tmp:
        (tmp / "w").write_text("v1")
    real = os.replace

    def die_between_the_renames(src, dst):
        real(src, dst)
        if str(dst).endswith(".old"):
            raise KeyboardInterrupt  # stands in for a kill right after the old folder was moved aside

    os.replace = die_between_the_renames
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(tmp_path / "best") as tmp:
                (tmp / "w").write_text("v2")
    finally:
        os.replace = real
    assert not (tmp_path / "best").exists()
    restored = clean_stale_temps(tmp_path)
    assert [p.name.endswith(".old") for p in restored] == [True]
    assert (tmp_path / "best" / "w").read_text() == "v1" and sorted(os.listdir(tmp_path)) == ["best"]
    summary["interrupted_replacement"]["cases"] += 1
