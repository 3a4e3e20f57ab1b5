"""Projection: UMAP quality on seeded clustered data, precomputed kNN reuse, cache, aligned layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("umap")
pytest.importorskip("faiss")

from ccclip_widgets import projection
from ccclip_widgets._io import CacheCorruptionWarning
from ccclip_widgets.neighbors import NeighborIndex
from ccclip_widgets.projection import (
    align_layout,
    cached_projection,
    fit_umap,
    procrustes_align,
    project_posts,
    rows_in_box,
    rows_in_polygon,
    trustworthiness,
)


def clustered(n: int = 2000, dim: int = 32, n_clusters: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = 3.0 * rng.standard_normal((n_clusters, dim))
    x = centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, NeighborIndex]:
    x = clustered()
    index = NeighborIndex.build([f"p{i}" for i in range(len(x))], x, clustered(seed=1), show_progress=False)
    return x, index


@pytest.fixture(scope="module")
def layout(data) -> np.ndarray:
    x, index = data
    return fit_umap(x, knn=index.knn_graph("image", k=15, show_progress=False), seed=0, show_progress=False)


def test_fit_umap_quality(data, layout):
    x, _ = data
    assert layout.shape == (len(x), 2) and layout.dtype == np.float32
    assert trustworthiness(x, layout, k=10, sample=1000) > 0.9


def test_precomputed_knn_reaches_umap(data, monkeypatch):
    x, index = data
    knn = index.knn_graph("image", k=20, show_progress=False)
    seen = {}
    import umap

    real = umap.UMAP

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(umap, "UMAP", Spy)
    # Guard: umap-learn must not run its own neighbor search when the graph is given.
    monkeypatch.setattr(umap.umap_, "nearest_neighbors", lambda *a, **k: pytest.fail("second kNN search"))
    xy = fit_umap(x[:500], knn=(knn[0][:500] % 500, knn[1][:500]), n_epochs=20, show_progress=False)
    assert xy.shape == (500, 2)
    pre_i, pre_d = seen["precomputed_knn"]
    assert pre_i.shape == (500, 15)  # pruned to n_neighbors
    np.testing.assert_array_equal(pre_i, knn[0][:500, :15] % 500)
    np.testing.assert_array_equal(pre_d, knn[1][:500, :15])


def test_project_posts_reuses_index_graph(data, layout, monkeypatch):
    _, index = data
    calls = []
    real = NeighborIndex.knn_graph

    def counting(self, *a, **k):
        calls.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(NeighborIndex, "knn_graph", counting)
    with monkeypatch.context() as m:
        m.setattr(NeighborIndex, "_graph_searcher", lambda *a, **k: pytest.fail("graph searched again"))
        xy = project_posts(index, kind="image", seed=0, show_progress=False)
    np.testing.assert_array_equal(xy, layout)  # same graph, same seed -> the same map as fit_umap above
    assert len(calls) == 1
    joint = project_posts(index, kind="joint", seed=0, n_epochs=30, show_progress=False)
    assert joint.shape == (2 * index.n, 2)


def test_knn_too_small_rejected(data):
    x, index = data
    with pytest.raises(ValueError, match="n_neighbors"):
        fit_umap(x, knn=index.knn_graph("image", k=5), n_neighbors=15, show_progress=False)


def test_coords_short_circuit(data):
    x, index = data
    xy = np.random.default_rng(0).random((len(x), 2))
    out = fit_umap(x, coords=xy)
    assert out.dtype == np.float32 and np.allclose(out, xy)
    assert np.allclose(project_posts(index, coords=xy), xy)
    with pytest.raises(ValueError, match="rows"):
        project_posts(index, coords=xy[:10])
    with pytest.raises(ValueError):
        fit_umap(x, coords=np.zeros((len(x), 3)))


def test_cache_hit_returns_identical_coords(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(len(calls)).random((50, 2))

    params = {"n_neighbors": 15, "min_dist": 0.1, "kind": "image"}
    a = cached_projection(tmp_path, "fp", params, compute)
    b = cached_projection(tmp_path, "fp", dict(reversed(list(params.items()))), compute)
    assert len(calls) == 1 and np.array_equal(a, b) and a.dtype == np.float32
    cached_projection(tmp_path, "fp2", params, compute)  # another fingerprint misses
    cached_projection(tmp_path, "fp", {**params, "min_dist": 0.2}, compute)  # other params miss
    assert len(calls) == 3
    meta = next(
        p
        for p in tmp_path.glob("*.json")
        if json.loads(p.read_text())["fingerprint"] == "fp"
        and json.loads(p.read_text())["params"]["min_dist"] == 0.1
    )
    # A corrupted .npy is detected and recomputed.
    npy = meta.with_suffix(".npy")
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.warns(CacheCorruptionWarning, match=r"umap-[0-9a-f]+\.npy is damaged"):
        c = cached_projection(tmp_path, "fp", params, compute)
    assert len(calls) == 4 and not np.array_equal(c, a)
    assert not list(tmp_path.glob("*.tmp"))


def test_project_posts_cache(data, tmp_path, monkeypatch):
    _, index = data
    first = project_posts(
        index, kind="text", seed=0, n_epochs=30, cache_dir=tmp_path, fingerprint="emb-1", show_progress=False
    )
    monkeypatch.setattr(projection, "fit_umap", lambda *a, **k: pytest.fail("recomputed"))
    again = project_posts(
        index, kind="text", seed=0, n_epochs=30, cache_dir=tmp_path, fingerprint="emb-1", show_progress=False
    )
    np.testing.assert_array_equal(first, again)


def test_procrustes_recovers_similarity_transform():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((100, 2)).astype(np.float32)
    t = np.deg2rad(70)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    moved = 3.0 * ref @ rot * np.array([1, -1]) + np.array([5.0, -2.0])  # rotate, reflect, scale, shift
    np.testing.assert_allclose(procrustes_align(moved, ref), ref, atol=1e-4)


def test_aligned_layout_close_to_reference(data, layout):
    x, index = data
    knn = index.knn_graph("image", k=15)
    aligned = align_layout(layout, x, knn=knn, seed=1, show_progress=False)
    spread = np.sqrt(((layout - layout.mean(0)) ** 2).sum(1).mean())
    err = np.sqrt(((aligned - layout) ** 2).sum(1).mean())
    assert err < 0.12 * spread
    # Refining from the reference does not cost layout quality.
    assert trustworthiness(x, aligned, sample=1000) > trustworthiness(x, layout, sample=1000) - 0.01
    # Without the shared init, an independent map (another seed) aligns much worse.
    free = procrustes_align(fit_umap(x, knn=knn, seed=1, n_epochs=100, show_progress=False), layout)
    assert err < np.sqrt(((free - layout) ** 2).sum(1).mean())


def test_trustworthiness_detects_a_bad_layout(data, layout):
    x, _ = data
    noise = np.random.default_rng(0).random((len(x), 2)).astype(np.float32)
    assert trustworthiness(x, noise, sample=1000) < 0.7 < trustworthiness(x, layout, sample=1000)


def test_rows_in_box_and_polygon_match_a_direct_check():
    xy = np.random.default_rng(5).uniform(-2, 2, (5000, 2)).astype(np.float32)
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    box = rows_in_box(xy, [1.0, -0.5], [0.25, -1.0])  # bounds in either order
    assert box.tolist() == np.flatnonzero((x >= -0.5) & (x <= 1) & (y >= -1) & (y <= 0.25)).tolist()
    tri = rows_in_polygon(xy, [0.0, 2.0, 0.0], [0.0, 0.0, 2.0])
    assert tri.tolist() == np.flatnonzero((x > 0) & (y > 0) & (x + y < 2)).tolist()
    # A concave "L": the notch is outside.
    ell = rows_in_polygon(xy, [-2, 0, 0, -1, -1, -2], [-2, -2, -1, -1, 0, 0])
    in_ell = ((x > -2) & (x < 0) & (y > -2) & (y < -1)) | ((x > -2) & (x < -1) & (y >= -1) & (y < 0))
    assert ell.tolist() == np.flatnonzero(in_ell).tolist()
    with pytest.raises(ValueError, match="at least 3 vertices"):
        rows_in_polygon(xy, [0, 1], [0, 1])
