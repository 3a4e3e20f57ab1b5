"""NeighborIndex: exact mode against numpy brute force, approximate recall, exclusions, kNN graph, save/load."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

pytest.importorskip("faiss")

from ccclip_widgets.neighbors import IndexIntegrityError, NeighborIndex


def clustered(n: int, dim: int = 32, n_clusters: int = 20, noise: float = 0.5, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centers."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def brute(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = queries @ base.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.fixture(scope="module")
def small() -> tuple[list[str], np.ndarray, np.ndarray, NeighborIndex]:
    n = 500
    img = clustered(n, seed=1)
    txt = clustered(n, seed=2)
    ids = [f"p{i:04d}" for i in range(n)]
    return ids, img, txt, NeighborIndex.build(ids, img, txt, show_progress=False)


def test_exact_mode_equals_brute_force(small):
    ids, img, txt, index = small
    assert index.mode == "exact"
    k = 10
    for r in (0, 17, 499):
        frame = index.image_to_texts(r, k=k)
        s, order = brute(img[r : r + 1], txt, k)
        assert frame.columns == ["rank", "post_id", "score", "index"]
        assert frame["rank"].to_list() == list(range(1, k + 1))
        assert frame["score"].dtype == pl.Float32
        np.testing.assert_allclose(frame["score"].to_numpy(), s[0], atol=1e-5)
        # Same set and order up to float ties.
        assert frame["index"].to_list() == order[0].tolist()
        assert frame["post_id"].to_list() == [ids[i] for i in order[0]]
    frame = index.text_to_images(ids[42], k=k)
    _, order = brute(txt[42:43], img, k)
    assert frame["index"].to_list() == order[0].tolist()

    scores, idx = index.search(txt[:25], target="image", k=k)
    s, order = brute(txt[:25], img, k)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_allclose(scores, s, atol=1e-5)
    assert (idx == order).mean() > 0.99


def test_query_vector_normalizes_and_checks_dimension(small):
    _, img, _, index = small
    frame = index.query_vector(3.0 * img[7], target="image", k=3)
    assert frame["index"][0] == 7
    assert frame["score"][0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="dimension"):
        index.query_vector(np.ones(5), target="image")


def test_same_modality_excludes_self(small):
    ids, img, txt, index = small
    for r in (0, 3, 250):
        f = index.image_to_images(r, k=10)
        assert r not in f["index"].to_list() and len(f) == 10
        _, order = brute(img[r : r + 1], img, 11)
        assert f["index"].to_list() == [i for i in order[0] if i != r][:10]
        f = index.text_to_texts(ids[r], k=10)
        assert r not in f["index"].to_list() and len(f) == 10
    # Cross-modality queries keep the post's own row.
    f = index.text_to_images(5, k=index.n)
    assert 5 in f["index"].to_list()


def test_shared_image_exclusion_and_dedupe():
    rng = np.random.default_rng(3)
    n_img = 60
    base = clustered(n_img, seed=4)
    # Posts 0..2 share image A (= base[0]); posts 3..4 share image B (= base[1], a near twin of A).
    base[1] = base[0] + 0.01 * rng.standard_normal(base.shape[1]).astype(np.float32)
    base[1] /= np.linalg.norm(base[1])
    img = np.concatenate([base[[0, 0, 0, 1, 1]], base[2:]])
    keys = ["A", "A", "A", "B", "B"] + [f"k{i}" for i in range(2, n_img)]
    txt = clustered(len(img), seed=5)
    ids = [f"p{i}" for i in range(len(img))]
    index = NeighborIndex.build(ids, img, txt, image_keys=keys, show_progress=False)
    f = index.image_to_images("p0", k=5)
    got = f["index"].to_list()
    assert not {0, 1, 2} & set(got)  # itself and the posts sharing its image are excluded
    assert got[0] in (3, 4)  # image B ranks first
    assert not ({3, 4} <= set(got))  # B is listed once
    assert len(got) == 5
    f = index.image_to_images("p0", k=5, dedupe=False)
    assert {3, 4} <= set(f["index"].to_list())
    # Text -> images lists each image once.
    f = index.text_to_images(10, k=index.n)
    keys_seen = [keys[i] for i in f["index"].to_list()]
    assert len(keys_seen) == len(set(keys_seen)) == len(set(keys))
    # Without image keys only the post itself is excluded.
    plain = NeighborIndex.build(ids, img, txt, show_progress=False)
    assert set(plain.image_to_images(0, k=2)["index"].to_list()) == {1, 2}


def test_bad_inputs():
    x = clustered(10)
    with pytest.raises(ValueError, match="unique"):
        NeighborIndex.build(["a"] * 10, x, show_progress=False)
    with pytest.raises(ValueError, match="rows"):
        NeighborIndex.build([str(i) for i in range(9)], x, show_progress=False)
    with pytest.raises(ValueError, match="either|give"):
        NeighborIndex.build([str(i) for i in range(10)], show_progress=False)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        NeighborIndex.build([str(i) for i in range(10)], bad, show_progress=False)
    index = NeighborIndex.build([str(i) for i in range(10)], x, show_progress=False)
    with pytest.raises(ValueError, match="no text"):
        index.image_to_texts(0)
    with pytest.raises(KeyError, match="unknown post_id"):
        index.image_to_images("nope")
    with pytest.raises(IndexError):
        index.image_to_images(10)


def test_approximate_recall_on_clustered_vectors():
    n, dim = 50_000, 64
    x = clustered(n, dim=dim, n_clusters=200, noise=0.35, seed=6)
    ids = [str(i) for i in range(n)]
    index = NeighborIndex.build(ids, text_vectors=x, exact_threshold=10_000, show_progress=False)
    assert index.mode != "exact"
    assert index.recall_at(10, n_queries=300, seed=123) >= 0.95
    assert index.recall_at(10, n_queries=300, seed=123, source="text") >= 0.95
    exact = NeighborIndex.build(ids[:2000], text_vectors=x[:2000], show_progress=False)
    assert exact.recall_at(10, n_queries=100) == pytest.approx(1.0)


def test_hnsw_mode_runs():
    n = 3000
    x = clustered(n, dim=32, seed=7)
    index = NeighborIndex.build(
        [str(i) for i in range(n)], x, exact_threshold=1000, ann="hnsw", show_progress=False
    )
    assert index.mode == "hnsw"
    assert index.recall_at(10, n_queries=200) >= 0.95
    f = index.image_to_images(0, k=10)
    assert 0 not in f["index"].to_list() and len(f) == 10


def test_knn_graph_self_first_cached_and_exact():
    n = 400
    img = clustered(n, seed=8)
    txt = clustered(n, seed=9)
    index = NeighborIndex.build([str(i) for i in range(n)], img, txt, show_progress=False)
    gi, gd = index.knn_graph("image", k=15, show_progress=False)
    assert gi.shape == (n, 15) and gi.dtype == np.int64 and gd.dtype == np.float32
    assert (gi[:, 0] == np.arange(n)).all() and (gd[:, 0] == 0).all()
    _, order = brute(img, img, 15)
    for r in (0, 99, 399):
        assert gi[r, 1:].tolist() == [i for i in order[r] if i != r][:14]
        np.testing.assert_allclose(gd[r, 1:], 1.0 - img[r] @ img[gi[r, 1:]].T, atol=1e-5)
    assert np.all(np.diff(gd, axis=1) >= -1e-6)
    # Cached: the same arrays come back, and a smaller k is a slice of the cache.
    again = index.knn_graph("image", k=15)
    assert again[0] is gi or np.shares_memory(again[0], gi)
    small_k = index.knn_graph("image", k=5)
    assert np.shares_memory(small_k[0], gi) and small_k[0].shape == (n, 5)
    ji, jd = index.knn_graph("joint", k=10, show_progress=False)
    assert ji.shape == (2 * n, 10) and (ji[:, 0] == np.arange(2 * n)).all()
    both = np.concatenate([img, txt])
    _, order = brute(both[[5, n + 5]], both, 10)
    assert ji[5, 1:].tolist() == [i for i in order[0] if i != 5][:9]
    assert ji[n + 5, 1:].tolist() == [i for i in order[1] if i != n + 5][:9]


@pytest.mark.slow  # 38-115 s: pynndescent compiles its kernels in every process (not cacheable by NUMBA_CACHE_DIR)
def test_large_graph_by_neighbor_descent_matches_brute_force(monkeypatch):
    pytest.importorskip("pynndescent")
    from ccclip_widgets import neighbors_graph

    monkeypatch.setattr(neighbors_graph, "GRAPH_EXACT_MAX", 500)  # 3,000 points take the descent path
    n = 3000
    img = clustered(n, n_clusters=30, seed=11)
    txt = clustered(n, n_clusters=30, seed=12)
    index = NeighborIndex.build([str(i) for i in range(n)], img, txt, show_progress=False)
    gi, gd = index.knn_graph("image", k=15, show_progress=False)
    assert gi.shape == (n, 15) and gi.dtype == np.int64 and gd.dtype == np.float32
    assert (gi[:, 0] == np.arange(n)).all() and (gd[:, 0] == 0).all()
    assert np.all(np.diff(gd, axis=1) >= -1e-6)
    rows = np.arange(0, n, 7)
    np.testing.assert_allclose(
        gd[rows, 1:], 1.0 - np.einsum("rd,rkd->rk", img[rows], img[gi[rows, 1:]]), atol=1e-5
    )
    _, order = brute(img[rows], img, 15)
    recall = np.mean([len(set(gi[r, 1:]) & (set(order[j]) - {r})) / 14 for j, r in enumerate(rows)])
    assert recall >= 0.95
    # Same seed, same graph.
    again = NeighborIndex.build([str(i) for i in range(n)], img, txt, show_progress=False)
    assert np.array_equal(again.knn_graph("image", k=15, show_progress=False)[0], gi)
    ji, _ = index.knn_graph("joint", k=10, show_progress=False)
    assert ji.shape == (2 * n, 10) and (ji[:, 0] == np.arange(2 * n)).all()
    assert (ji[:n, 1:] < n).mean() > 0.9  # image rows mostly find images (separate clusters)


def test_knn_graph_with_duplicates_keeps_self_first():
    x = clustered(50, seed=10)
    x[1] = x[0]
    x[2] = x[0]
    index = NeighborIndex.build([str(i) for i in range(50)], x, show_progress=False)
    gi, gd = index.knn_graph("image", k=5, show_progress=False)
    assert gi[1, 0] == 1 and gi[2, 0] == 2 and set(gi[1, 1:3]) == {0, 2}
    assert np.allclose(gd[1, :3], 0.0, atol=1e-6)


def test_save_load_round_trip_and_corruption(tmp_path):
    n = 300
    img, txt = clustered(n, seed=11), clustered(n, seed=12)
    ids = [f"id{i}" for i in range(n)]
    keys = [f"img{i // 2}" for i in range(n)]
    index = NeighborIndex.build(ids, img, txt, image_keys=keys, fingerprint="fp-1", show_progress=False)
    (tmp_path / "other.txt").write_text("left alone")
    index.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["n"] == n and manifest["kinds"] == ["image", "text"] and manifest["fingerprint"] == "fp-1"
    assert set(manifest["files"]) == {"image.faiss", "text.faiss", "posts.parquet"}
    assert (tmp_path / "other.txt").read_text() == "left alone"
    assert not list(tmp_path.glob("*.tmp"))

    back = NeighborIndex.load(tmp_path, fingerprint="fp-1")
    assert back.n == n and back.kinds == ("image", "text") and back.dims == {"image": 32, "text": 32}
    for r in (0, 150):
        assert back.image_to_images(r).equals(index.image_to_images(r))
        assert back.text_to_images(ids[r]).equals(index.text_to_images(ids[r]))
    np.testing.assert_array_equal(back.vectors("text"), index.vectors("text"))

    with pytest.raises(IndexIntegrityError, match="fingerprint"):
        NeighborIndex.load(tmp_path, fingerprint="other")

    path = tmp_path / "text.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="checksum"):
        NeighborIndex.load(tmp_path)
    path.unlink()
    with pytest.raises(IndexIntegrityError, match="missing"):
        NeighborIndex.load(tmp_path)
    with pytest.raises(IndexIntegrityError, match="manifest"):
        NeighborIndex.load(tmp_path / "nowhere")


def test_ivf_save_load_round_trip(tmp_path):
    n = 5000
    x = clustered(n, dim=16, seed=13)
    ids = [str(i) for i in range(n)]
    index = NeighborIndex.build(ids, x, exact_threshold=1000, ann="ivf", nprobe=8, show_progress=False)
    index.save(tmp_path)
    back = NeighborIndex.load(tmp_path)
    assert back.mode == "ivf" and back.nprobe == 8
    np.testing.assert_allclose(back.vectors("image"), index.vectors("image"))
    assert back.image_to_images(3).equals(index.image_to_images(3))


def test_gap_shifted_probing_keeps_exact_scores():
    rng = np.random.default_rng(14)
    n, dim = 5000, 32
    img = clustered(n, dim=dim, n_clusters=50, noise=0.6, seed=15)
    gap = rng.standard_normal(dim).astype(np.float32)
    txt = img + 1.5 * gap / np.linalg.norm(gap) + 0.1 * rng.standard_normal((n, dim)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ids = [str(i) for i in range(n)]
    index = NeighborIndex.build(
        ids, img, txt, exact_threshold=1000, nlist=64, nprobe=8, target_recall=None, show_progress=False
    )
    assert index.mode == "ivf"
    # Scores are the exact inner products with the original query, whichever lists were probed.
    f = index.image_to_texts(7, k=10)
    np.testing.assert_allclose(f["score"].to_numpy(), txt[f["index"].to_numpy()] @ img[7], atol=1e-5)
    assert index.recall_at(10, n_queries=200, kind="text", source="image") >= 0.9
    # Probing every list gives the exact answer.
    index.nprobe = 64
    for r in (3, 99):
        _, order = brute(img[r : r + 1], txt, 10)
        assert index.image_to_texts(r, k=10)["index"].to_list() == order[0].tolist()
    scores, idx = index.search(txt[:5], target="image", k=5, source="text")
    s, order = brute(txt[:5], img, 5)
    np.testing.assert_allclose(scores, s, atol=1e-5)


def test_tune_widens_search_until_target():
    n = 20_000
    x = clustered(n, dim=32, n_clusters=100, noise=0.5, seed=16)
    y = clustered(n, dim=32, n_clusters=100, noise=0.5, seed=17)
    ids = [str(i) for i in range(n)]
    index = NeighborIndex.build(
        ids, x, y, exact_threshold=1000, nprobe=1, target_recall=None, show_progress=False
    )
    report = index.tune(0.95, show_progress=False)
    assert report["nprobe"] > 1 and index.nprobe == report["nprobe"]
    widths = [h["nprobe"] for h in report["history"]]
    assert widths == sorted(widths) and report["history"][-1]["recall"] >= 0.95
    assert {"image_to_text", "text_to_image", "image_to_image", "text_to_text"} <= set(report["history"][-1])
    assert index.recall_at(10, n_queries=200, seed=5) >= 0.9
    with pytest.warns(RuntimeWarning, match="cap"):
        index.tune(0.999999, max_nprobe=2, show_progress=False)
