"""Embedding: cache hits, bad images, resume after SIGKILL, torch.distributed (gloo, 2 processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from ccclip_testkit import make_shape_posts

from ccclip_widgets.embed import embed_posts, encode_images, encode_texts
from ccclip_widgets.models import save_checkpoint
from ccclip_widgets.posts import read_posts

REPO = Path(__file__).resolve().parent.parent


def test_vectors_match_direct_encoding_and_are_normalised(tiny_model, shape_posts, tmp_path):
    emb = embed_posts(shape_posts, tiny_model, store=tmp_path / "store", show_progress=False, num_workers=0)
    assert len(emb) == len(shape_posts) == 24
    assert emb.image.shape == emb.text.shape == (24, 32)
    np.testing.assert_allclose(np.linalg.norm(emb.image, axis=1), 1.0, rtol=1e-5)
    direct_t = encode_texts(tiny_model, shape_posts.table["text"].to_list())
    direct_i = encode_images(tiny_model, shape_posts.table["image_path"].to_list())
    np.testing.assert_allclose(emb.text, direct_t, atol=1e-6)
    np.testing.assert_allclose(emb.image, direct_i, atol=1e-5)
    assert emb.stats["images_encoded"] == 24 and emb.stats["images_reused"] == 0


def test_second_run_is_a_cache_hit(tiny_model, shape_posts, tmp_path, monkeypatch):
    first = embed_posts(shape_posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    import ccclip_widgets.embed as E

    def boom(*a, **k):
        raise AssertionError("the model must not run on a cache hit")

    monkeypatch.setattr(E, "_image_features", boom)
    monkeypatch.setattr(E, "_text_features", boom)
    second = embed_posts(shape_posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    assert second.stats["images_reused"] == 24 and second.stats["images_encoded"] == 0
    assert second.stats["texts_reused"] == 24 and second.stats["texts_encoded"] == 0
    np.testing.assert_array_equal(first.image, second.image)
    assert first.fingerprint == second.fingerprint


def test_shared_images_and_texts_encoded_once(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")[:4]
    extra = [dict(r, post_id=r["post_id"] + "-de", text="Sieht gut aus!") for r in recs]
    posts = read_posts(pl.DataFrame(recs + extra), image_root=tmp_path / "imgs")
    emb = embed_posts(posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    assert emb.stats["images_encoded"] == 4 and emb.stats["texts_encoded"] == 5
    np.testing.assert_array_equal(emb.image[:4], emb.image[4:])


def test_corrupt_image_found_while_embedding_is_a_reject(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")[:6]
    posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs", check_images="none")
    # damage one file after the table was read (the header check did not run)
    bad = Path(posts.table["image_path"][2])
    bad.write_bytes(bad.read_bytes()[:200])
    emb = embed_posts(posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    assert len(emb) == 5
    assert emb.rejects["post_id"].to_list() == [recs[2]["post_id"]]
    assert emb.rejects["row"].to_list() == [2]
    assert emb.stats["images_failed"] == 1
    assert recs[2]["post_id"] not in emb.post_ids


def test_worker_processes_give_same_vectors(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs", n_per=3)  # 72 posts: enough for workers
    posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs")
    a = embed_posts(posts, tiny_model, store=tmp_path / "a", show_progress=False, num_workers=0)
    b = embed_posts(
        posts, tiny_model, store=tmp_path / "b", show_progress=False, num_workers=2, batch_size=16
    )
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import ccclip_widgets.store as S
    from ccclip_widgets.embed import embed_posts
    from ccclip_widgets.models import load_model
    from ccclip_widgets.posts import read_posts

    kill_after = int(sys.argv[4])
    original = S.EmbeddingStore.write_part
    count = {"n": 0}

    def write_part(self, kind, keys, vectors, **kw):
        if kind == "images" and count["n"] == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        count["n"] += kind == "images"
        return original(self, kind, keys, vectors, **kw)

    if kill_after >= 0:
        S.EmbeddingStore.write_part = write_part
    posts = read_posts(sys.argv[1])
    model = load_model(sys.argv[2], device="cpu")
    emb = embed_posts(posts, model, store=sys.argv[3], part_size=8, batch_size=8, num_workers=0,
                      show_progress=False)
    print("encoded", emb.stats["images_encoded"], "reused", emb.stats["images_reused"])
    """
)


@pytest.mark.slow  # 48 s and 30 s: subprocesses import torch
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs", n_per=2)  # 48 posts -> 6 image parts of 8
    pl.DataFrame(recs).write_csv(tmp_path / "imgs" / "posts.csv")
    ck = save_checkpoint(tiny_model, tmp_path / "model")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(tmp_path / "imgs" / "posts.csv"), str(ck)]
    killed = subprocess.run([*args, str(tmp_path / "s"), "3"], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    parts = list((tmp_path / "s").rglob("images/part-*.parquet"))
    assert len(parts) == 3, "three finished parts survive the kill"
    resumed = subprocess.run([*args, str(tmp_path / "s"), "-1"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "encoded 24 reused 24" in resumed.stdout  # only the unfinished half was recomputed
    clean = subprocess.run([*args, str(tmp_path / "clean"), "-1"], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    posts = read_posts(tmp_path / "imgs" / "posts.csv")
    a = embed_posts(posts, tiny_model, store=tmp_path / "s", show_progress=False)
    b = embed_posts(posts, tiny_model, store=tmp_path / "clean", show_progress=False)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.text, b.text)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one(tiny_model, tmp_path):
    recs = make_shape_posts(tmp_path / "imgs", n_per=2)
    pl.DataFrame(recs).write_csv(tmp_path / "imgs" / "posts.csv")
    ck = save_checkpoint(tiny_model, tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = [str(tmp_path / "imgs" / "posts.csv"), "--model", str(ck), "--device", "cpu", "--no-progress"]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "ccclip_widgets.cli",
            "embed",
            *base,
            "--out",
            str(tmp_path / "two"),
            "--workers",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "embedded now: 48 images" in two.stdout
    one = subprocess.run(
        [sys.executable, "-m", "ccclip_widgets.cli", "embed", *base, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    posts = read_posts(tmp_path / "imgs" / "posts.csv")
    a = embed_posts(posts, tiny_model, store=tmp_path / "two" / "store", show_progress=False)
    b = embed_posts(posts, tiny_model, store=tmp_path / "one" / "store", show_progress=False)
    assert a.stats["images_encoded"] == 0 and b.stats["images_encoded"] == 0
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    np.testing.assert_allclose(a.text, b.text, atol=1e-5)
    parts = list((tmp_path / "two" / "store").rglob("images/part-*.parquet"))
    assert len(parts) >= 2, "both ranks wrote their share"


# --------------------------------------------------------------------------------------------- overlapped pipeline
def test_tokenize_counting_equals_tokenize_plus_count(tiny_model):
    texts = ["a cat", "word " * 120, "", "émoji 😂 #tag @user", "x " * 75, "x " * 76]
    tokens, n_cut = tiny_model.tokenize_counting(texts)
    assert torch.equal(tokens, tiny_model.tokenize(texts))
    assert n_cut == tiny_model.count_truncated(texts)


def test_text_worker_processes_give_the_serial_vectors(tiny_model, tmp_path, monkeypatch):
    """Texts tokenized in worker processes, interleaved with image batches: the same vectors as encode_texts."""
    import ccclip_widgets.embed as E

    recs = make_shape_posts(tmp_path / "imgs", n_per=3)  # 72 posts
    recs = [dict(r, text=f"{r['text']} " + "long " * (90 if i % 7 == 0 else 0)) for i, r in enumerate(recs)]
    posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs")
    monkeypatch.setattr(E, "default_text_workers", lambda *a, **k: 2)
    emb = embed_posts(
        posts,
        tiny_model,
        store=tmp_path / "s",
        show_progress=False,
        num_workers=1,
        batch_size=16,
        text_batch_size=8,
    )
    texts = posts.table["text"].to_list()
    np.testing.assert_allclose(emb.text, encode_texts(tiny_model, texts), atol=1e-6)
    np.testing.assert_allclose(
        emb.image, encode_images(tiny_model, posts.table["image_path"].to_list()), atol=1e-5
    )
    assert emb.stats["texts_truncated"] == tiny_model.count_truncated(sorted(set(texts)))


def test_each_unique_text_is_tokenized_once_and_stored_ones_are_only_counted(
    tiny_model, tmp_path, monkeypatch
):
    import ccclip_widgets.models as M

    recs = make_shape_posts(tmp_path / "imgs")[:6]
    long = "very " * 100
    dup = [dict(r, post_id=r["post_id"] + "-b") for r in recs]  # same texts again
    posts = read_posts(
        pl.DataFrame(recs + dup + [dict(recs[0], post_id="L1", text=long)]), image_root=tmp_path / "imgs"
    )
    seen: list[str] = []
    original = M.tokenize_counting

    def spy(tokenizer, texts, context_length):
        seen.extend(texts)
        return original(tokenizer, texts, context_length)

    monkeypatch.setattr(M, "tokenize_counting", spy)
    first = embed_posts(posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    assert sorted(seen) == sorted({r["text"] for r in recs} | {long})
    assert first.stats["texts_encoded"] == 7 and first.stats["texts_truncated"] == 1
    seen.clear()
    again = embed_posts(posts, tiny_model, store=tmp_path / "s", show_progress=False, num_workers=0)
    assert seen == [] and again.stats["texts_truncated"] == 1  # counted, not tokenized for vectors


def test_worker_sizing_follows_the_decoder_and_the_cores():
    from ccclip_widgets.embed import default_num_workers, default_text_workers

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_num_workers(cuda, 8192, device_decode=True, cores=16) == 2  # measured best for nvJPEG
    assert default_num_workers(cuda, 8192, device_decode=True, cores=2) == 1
    assert default_num_workers(cuda, 8192, cores=16) == 15  # PIL decoding wants every core
    assert default_num_workers(cpu, 8192, cores=2) == 1
    assert default_num_workers(cuda, 10, device_decode=True, cores=16) == 0
    assert default_text_workers(cuda, 32768, 2, cores=16) == 4
    assert default_text_workers(cuda, 32768, 15, cores=16) == 1
    assert default_text_workers(cuda, 100, 2, cores=16) == 0
    assert default_text_workers(cpu, 32768, 1, cores=2) == 0


def test_texts_keep_pace_with_images_and_every_part_is_written(
    tiny_model, shape_posts, tmp_path, monkeypatch
):
    """Small text chunks next to large image batches: the texts are interleaved, not left for the end."""
    from ccclip_widgets.store import EmbeddingStore

    order: list[tuple[str, int]] = []
    real = EmbeddingStore.write_part

    def recording(self, kind, keys, vectors, **columns):
        order.append((kind, len(keys)))
        return real(self, kind, keys, vectors, **columns)

    monkeypatch.setattr(EmbeddingStore, "write_part", recording)
    emb = embed_posts(
        shape_posts,
        tiny_model,
        store=tmp_path / "s",
        show_progress=False,
        num_workers=0,
        batch_size=8,
        text_batch_size=2,
        part_size=2,
    )
    assert sum(n for k, n in order if k == "texts") == sum(n for k, n in order if k == "images") == 24
    last_image = max(i for i, (k, _) in enumerate(order) if k == "images")
    texts_before = sum(n for k, n in order[:last_image] if k == "texts")
    # 3 image batches of 8 and 12 text chunks of 2: taking one chunk per batch would leave 18 texts for the end
    assert texts_before >= 12, order
    direct = encode_texts(tiny_model, shape_posts.table["text"].to_list())
    np.testing.assert_allclose(emb.text, direct, atol=1e-6)


@pytest.mark.parametrize("background", [True, False])
def test_a_failing_part_write_keeps_the_parts_written(
    tiny_model, shape_posts, tmp_path, monkeypatch, background
):
    import ccclip_widgets.embed as E
    from ccclip_widgets.store import EmbeddingStore

    # the background writer is what a GPU run uses; inline writes are the CPU's
    monkeypatch.setattr(E, "BACKGROUND_WRITE_DEVICES", frozenset({"cpu", "cuda"} if background else {"cuda"}))
    real = EmbeddingStore.write_part
    calls = {"n": 0}

    def flaky(self, kind, keys, vectors, **columns):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (injected)")
        return real(self, kind, keys, vectors, **columns)

    monkeypatch.setattr(EmbeddingStore, "write_part", flaky)
    kw = dict(show_progress=False, num_workers=0, batch_size=4, text_batch_size=4, part_size=4)
    with pytest.raises(OSError, match="disk full"):
        embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **kw)
    monkeypatch.setattr(EmbeddingStore, "write_part", real)
    again = embed_posts(shape_posts, tiny_model, store=tmp_path / "s", **kw)
    redone = again.stats["images_encoded"] + again.stats["texts_encoded"]
    if background:
        # the loop went on: 6 image and 6 text parts were tried, all but the failed one (4 vectors) kept
        assert calls["n"] == 12 and redone == 4
    else:
        # the loop stopped at the failure: the part written before it is kept, the rest is encoded again
        assert calls["n"] == 2 and redone == 48 - 4
