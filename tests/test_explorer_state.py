"""The Explorer's state without a browser (and mostly without widgets): neighbor filters, map cross-filters, cluster
labels, what changed between two models, progress and quiet dependencies (issue 13, Explorer parts; issue 12 item 1).

Synthetic posts with known vectors make the expected answers computable by brute force.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.embed import Embeddings
from ccclip_widgets.posts import Posts
from ccclip_widgets.widgets.explorer_state import ExplorerState

N = 120
KINDS = np.array(["descriptive", "commentative"])
LANGS = np.array(["en", "uk", "es", "de"])
REPO = Path(__file__).resolve().parents[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int = N, seed: int = 0, shift: float = 0.0) -> Embeddings:
    """``n`` posts in 4 topics: vectors near a topic center; metadata columns cycling through kinds and languages."""
    rng = np.random.default_rng(seed)
    topic = np.arange(n) % 4
    centers = rng.normal(size=(4, 16))
    img = _unit(centers[topic] + 0.6 * rng.normal(size=(n, 16)))
    txt = _unit(centers[topic] + 0.6 * rng.normal(size=(n, 16)) + shift * rng.normal(size=(n, 16)))
    words = np.array(["fireworks night sky", "red apple fruit", "flag of france", "cat sleeping sofa"])
    table = pl.DataFrame(
        {
            "post_id": [f"q{i:04d}" for i in range(n)],
            "image": [f"{i}.png" for i in range(n)],
            "image_path": pl.Series([None] * n, dtype=pl.String),
            "image_bytes": pl.Series([None] * n, dtype=pl.Binary),
            "text": [f"{words[t]} post {i}" for i, t in enumerate(topic)],
            "image_key": [f"k{i}" for i in range(n)],
            "text_key": [f"t{i}" for i in range(n)],
            "row": np.arange(n),
            "caption_kind": KINDS[(np.arange(n) // 4) % 2],
            "lang": LANGS[(np.arange(n) // 8) % 4],
            "split": np.where(np.arange(n) % 5 == 0, "test", "train"),
            "likes": np.arange(n) * 3,
        }
    )
    return Embeddings(Posts(table), img, txt, f"fp{seed}{shift}", f"synthetic-{seed}", pl.DataFrame())


@pytest.fixture(scope="module")
def emb() -> Embeddings:
    return synthetic()


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Map coordinates: one well separated blob per topic."""
    rng = np.random.default_rng(1)
    centers = np.array([[0, 0], [12, 0], [0, 12], [12, 12]], np.float32)
    return (centers[np.arange(N) % 4] + rng.normal(size=(N, 2))).astype(np.float32)


@pytest.fixture
def state(emb: Embeddings, blobs: np.ndarray) -> ExplorerState:
    return ExplorerState(emb, coords=blobs, k=6, show_progress=False)


def _brute(emb: Embeddings, row: int, src: str, dst: str, allowed: np.ndarray, k: int) -> list[str]:
    q = getattr(emb, src)[row]
    sc = getattr(emb, dst) @ q
    sc[~allowed] = -np.inf
    if src == dst:
        sc[row] = -np.inf
    order = np.argsort(-sc, kind="stable")[:k]
    return [emb.post_ids[i] for i in order if np.isfinite(sc[i])]


# ------------------------------------------------------------------------------------------------ state alone
def test_state_runs_without_any_widget_library() -> None:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_explorer_state import synthetic; "
        "from ccclip_widgets.widgets.explorer_state import ExplorerState; import numpy as np; "
        "st = ExplorerState(synthetic(), coords=np.random.default_rng(0).normal(size=(120, 2)), show_progress=False); "
        "st.set_filter(caption_kind='commentative').click(3).set_map_filter('lang', ['uk']).select(range(40)); "
        "assert st.neighbors.height == 10 and st.selection['lang'].unique().to_list() == ['uk']; "
        "st.set_cluster_labels(True); assert st.clusters.height >= 2; "
        "bad = [m for m in ('ipywidgets', 'plotly', 'IPython') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=REPO)


def test_one_update_path_notifies_views_then_callbacks(state: ExplorerState) -> None:
    order: list[str] = []
    state.on_change(lambda parts, source: order.append("view:" + ",".join(sorted(parts))))
    state.on_click(lambda post: order.append("click:" + post["post_id"]))
    state.on_select(lambda frame: order.append(f"select:{frame.height}"))
    assert state.click("q0005") is state
    assert order == ["view:current,neighbors", "click:q0005"]
    order.clear()
    state.select([1, 2], source="me")
    assert order == ["view:selection", "select:2"]
    order.clear()
    state.set_k(6)  # unchanged: nothing to redraw
    assert order == ["view:"]


# ------------------------------------------------------------------------------------------------ neighbor filters
@pytest.mark.parametrize("exact_max", [None, 0], ids=["exact-subset", "over-fetch"])
def test_neighbor_filter_runs_in_the_search(
    state: ExplorerState, emb: Embeddings, exact_max, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ccclip_widgets import neighbors

    if exact_max is not None:  # force the over-fetch path of the index
        monkeypatch.setattr(neighbors, "FILTER_EXACT_MAX", exact_max)
    table = emb.posts.table
    state.set_filter(caption_kind="commentative", lang="uk").click(2)
    allowed = ((table["caption_kind"] == "commentative") & (table["lang"] == "uk")).to_numpy()
    nb = state.neighbors
    assert nb.height == 6
    assert set(table["caption_kind"].gather(nb["index"])) == {"commentative"}
    assert set(table["lang"].gather(nb["index"])) == {"uk"}
    assert nb["post_id"].to_list() == _brute(emb, 2, "image", "text", allowed, 6)
    assert state.neighbor_filter == {"caption_kind": ["commentative"], "lang": ["uk"]}
    # every mode honors it; a list of values means "any of them"
    state.set_mode("text_to_texts").set_filter(lang=["de", "es"])
    allowed = table["lang"].is_in(["de", "es"]).to_numpy()
    assert state.neighbors["post_id"].to_list() == _brute(emb, 2, "text", "text", allowed, 6)
    state.set_filter()
    assert state.neighbor_filter == {} and state.neighbors.height == 6
    with pytest.raises(ValueError, match="no such column"):
        state.set_filter(colour="red")


def test_index_queries_take_allowed_rows(emb: Embeddings) -> None:
    from ccclip_widgets.neighbors import NeighborIndex

    idx = NeighborIndex.build(emb.post_ids, emb.image, emb.text, show_progress=False)
    allowed = np.zeros(N, bool)
    allowed[[5, 17, 33]] = True
    res = idx.image_to_texts(0, 10, allowed=allowed)
    assert sorted(res["index"].to_list()) == [5, 17, 33]  # fewer than k allowed: all of them, best first
    assert idx.query_vector(emb.text[7], "image", 2, allowed=[7, 8, 9])["index"].to_list()[0] == 7
    assert idx.image_to_texts(0, 3, allowed=np.zeros(N, bool)).height == 0


def test_search_is_filtered_too(emb: Embeddings, blobs: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    import ccclip_widgets.embed as embed_mod

    class FakeModel:
        fingerprint = None

    monkeypatch.setattr(embed_mod, "encode_texts", lambda model, texts: emb.text[[9]])
    st = ExplorerState(emb, model=FakeModel(), coords=blobs, k=5, show_progress=False)
    st.set_filter(lang="es").search("anything")
    assert set(st.posts["lang"].gather(st.search_results["index"])) == {"es"}
    st.clear_search()
    assert st.search_results is None and st.search_query is None


# ------------------------------------------------------------------------------------------------ map filters
def test_map_filter_fades_and_restricts_selection(state: ExplorerState, emb: Embeddings) -> None:
    frames: list[pl.DataFrame] = []
    state.on_select(frames.append)
    state.select(range(0, 40))
    state.set_map_filter("lang", ["uk", "de"])
    vis = state.visible
    assert vis is not None and vis.sum() == emb.posts.table["lang"].is_in(["uk", "de"]).sum()
    assert set(state.selection["lang"]) <= {"uk", "de"} and state.selection.height > 0
    assert frames[-1].equals(state.selection)  # the narrowed selection was reported
    state.select(range(N))  # a lasso over faded posts selects only the bright ones
    assert state.selection.height == vis.sum()
    state.set_map_filter("likes", (30, 120))  # a numeric range, combined with the values filter
    likes = state.selection["likes"]
    assert likes.min() >= 30 and likes.max() <= 120 and set(state.selection["lang"]) <= {"uk", "de"}
    assert state.map_filter == {"lang": ["uk", "de"], "likes": (30, 120)}
    state.set_map_filter("likes", None).set_map_filter("split", "test")
    assert set(state.selection["split"]) == {"test"}
    state.clear_map_filters()
    assert state.visible is None and state.map_filter == {}
    assert {
        "lang": "values",
        "split": "values",
        "likes": "range",
    }.items() <= state.map_filter_options().items()
    with pytest.raises(ValueError):
        state.set_map_filter("nope", ["x"])


# ------------------------------------------------------------------------------------------------ clusters
def test_cluster_map_recovers_blobs(blobs: np.ndarray) -> None:
    from ccclip_widgets.clusters import cluster_map

    for method in ("hdbscan", "kmeans"):
        lab = cluster_map(blobs, method=method, n_clusters=4, min_cluster_size=20)
        topic = np.arange(N) % 4
        # each topic is (mostly) one cluster
        for t in range(4):
            codes = lab[(topic == t) & (lab >= 0)]
            assert np.bincount(codes).max() >= 0.9 * len(codes), method
        assert len(set(lab[lab >= 0])) == 4, method


def test_cluster_labels_are_their_words(state: ExplorerState) -> None:
    state.set_cluster_labels(True, n_clusters=4)
    frame = state.clusters
    assert frame.columns == ["cluster", "label", "size", "x", "y"] and frame.height == 4
    labels = " | ".join(frame["label"].to_list())
    for word in ("fireworks", "apple", "flag", "cat"):
        assert word in labels
    assert "post" not in labels  # a word in every cluster names none of them
    state.set_color("cluster")
    assert state.color.kind == "categorical" and any("fireworks" in c for c in state.color.categories)


def test_cluster_labels_on_the_demo_texts() -> None:
    """Posts of the demo whose keywords say "flag" (any language) form a cluster whose label says flag."""
    from ccclip_widgets.clusters import label_clusters

    path = REPO / "data" / "demo" / "posts.parquet"
    if not path.is_file():
        pytest.skip("demo data not in this checkout")
    t = pl.read_parquet(path)
    kw = t["keywords"].fill_null("").str.to_lowercase()
    topic = np.select(
        [
            kw.str.contains("flag").to_numpy(),
            kw.str.contains("food").to_numpy(),
            kw.str.contains("animal").to_numpy(),
        ],
        [0, 1, 2],
        3,
    )
    names = label_clusters(t["text"].to_list(), topic, langs=t["lang"].to_list())
    assert "flag" in names[0] and "food" in names[1] and "animal" in names[2]
    # multilingual: the Ukrainian, Spanish and German posts of that cluster alone still name it
    other = (t["lang"] != "en").to_numpy()
    names = label_clusters(
        [s for s, o in zip(t["text"].to_list(), other) if o],
        topic[other],
        langs=t["lang"].filter(other).to_list(),
        top_n=6,
        min_share=0.01,  # commentary is varied: a topic word is in fewer of its posts than in captions
    )
    assert {"прапор", "bandera", "flagge"} & set(names[0]), names[0]


# ------------------------------------------------------------------------------------------------ two models
@pytest.fixture(scope="module")
def pair(emb: Embeddings, blobs: np.ndarray) -> ExplorerState:
    other = synthetic(seed=0, shift=0.8)  # the same posts, texts moved
    return ExplorerState(emb, compare=other, coords=blobs, compare_coords=blobs, k=5, show_progress=False)


def test_rank_changes_for_a_clicked_post(pair: ExplorerState) -> None:
    pair.set_filter().set_mode("image_to_texts").click(4)
    ch = pair.rank_changes
    assert ch is not None and {"post_id", "rank_a", "rank_b", "change", "in_a", "in_b", "text"} <= set(
        ch.columns
    )
    a, b = pair.neighbors, pair.compare_neighbors
    assert set(ch["post_id"]) == set(a["post_id"]) | set(b["post_id"])
    # ranks agree with each model's own list, and change = rank_a - rank_b
    top_a = dict(zip(a["post_id"], a["rank"]))
    for r in ch.iter_rows(named=True):
        if r["post_id"] in top_a:
            assert r["rank_a"] == top_a[r["post_id"]]
        assert r["change"] == r["rank_a"] - r["rank_b"]
    assert a["rank_other"].to_list() == [
        ch.filter(pl.col("post_id") == p)["rank_b"].item() for p in a["post_id"]
    ]


def test_text_shift_lists_posts_that_moved_most(pair: ExplorerState, emb: Embeddings) -> None:
    frame = pair.text_shift()
    assert frame.height == N and frame["rank_gain"].is_sorted(descending=True)
    worst = pair.text_shift("rank_gain", descending=False)
    assert worst["rank_gain"][0] == frame["rank_gain"].min()
    # rank_a is the rank of the post's own image for its own text under the first model (brute force)
    r = frame.row(0, named=True)
    sc = emb.image @ emb.text[r["index"]]
    expect = int((sc > sc[r["index"]]).sum()) + 1
    assert r["rank_a"] == (expect if expect <= 100 else None)
    assert frame["text_neighbors_changed"].max() > 0
    with pytest.raises(RuntimeError):
        ExplorerState(emb, coords=np.zeros((N, 2)), show_progress=False).text_shift()


# ------------------------------------------------------------------------------------------------ quiet first run
def test_progress_phases_are_reported(emb: Embeddings, blobs: np.ndarray) -> None:
    seen: list[str] = []

    class Recorder:
        import contextlib

        @contextlib.contextmanager
        def phase(self, text):
            seen.append(text)
            yield

        def done(self, text=""):
            seen.append("done")

    ExplorerState(emb, coords=blobs, progress=Recorder(), show_progress=False)
    assert seen[0].startswith("neighbor index") and seen[1].startswith("map") and seen[-1] == "done"


def test_umap_runs_quietly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from ccclip_widgets import projection

    got: dict = {}

    class FakeUMAP:
        def __init__(self, **kw):
            got.update(kw)

        def fit_transform(self, x):
            warnings.warn(
                "Spectral initialisation failed! The eigenvector solver\nfailed.", UserWarning, stacklevel=1
            )
            warnings.warn("Spectral initialisation failed! again", UserWarning, stacklevel=1)
            return np.zeros((len(x), 2))

    class FakeModule:
        UMAP = FakeUMAP

    monkeypatch.setattr(projection, "_umap", lambda: FakeModule)
    x = _unit(np.random.default_rng(0).normal(size=(20, 8)))
    knn = (np.tile(np.arange(15), (20, 1)), np.zeros((20, 15), np.float32))
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.INFO, "ccclip_widgets.projection"),
    ):
        warnings.simplefilter("always")
        projection.fit_umap(x, knn=knn, show_progress=True)
    assert got["verbose"] is False and got["tqdm_kwds"]["disable"] is False  # epochs bar, no raw dump
    assert not [w for w in caught if "Spectral" in str(w.message)]
    assert sum("random layout" in r.getMessage() for r in caplog.records) == 1


def test_loading_a_checkpoint_does_not_say_random(
    tiny_model, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ccclip_widgets.models import load_model, save_checkpoint

    folder = save_checkpoint(tiny_model, tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING):
        load_model(str(folder), device="cpu")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
