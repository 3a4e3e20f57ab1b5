"""Widget-state tests of the Explorer: no browser; clicks and selections simulated as the front end sends them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from ccclip_testkit import load_tiny, make_shape_posts

from ccclip_widgets.embed import Embeddings, embed_posts, encode_texts
from ccclip_widgets.posts import Posts, posts_from_records
from ccclip_widgets.widgets import Explorer
from ccclip_widgets.widgets._common import INSTALL_HINT, ThumbnailCache, post_card_html, truncate

K = 5


# ------------------------------------------------------------------------------------------------ fixtures
# The posts, models and embeddings are built once per module (embedding is the slow part); every test gets a
# fresh Explorer on them.
@pytest.fixture(scope="module")
def model(tiny_arch: str):
    """The tiny seeded CLIP of the ``tiny_model`` fixture, shared by this module's tests."""
    return load_tiny(tiny_arch, 0)


@pytest.fixture(scope="module")
def second_model(tiny_arch: str):
    """Another tiny model with different random weights (stands in for a fine-tuned one)."""
    return load_tiny(tiny_arch, 1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("explorer")


@pytest.fixture(scope="module")
def rich_posts(workdir: Path) -> Posts:
    """24 shape posts with two caption kinds, two languages and two metadata columns."""
    recs = make_shape_posts(workdir / "imgs")
    for i, r in enumerate(recs):
        r["caption_kind"] = "commentative" if i % 3 == 0 else "descriptive"
        r["lang"] = "en" if i % 2 == 0 else "de"
        r["likes"] = i * 7  # an integer column with many values: continuous
        r["source"] = ["forum", "feed", "chat"][i % 3]
    return posts_from_records(recs, image_root=workdir / "imgs")


@pytest.fixture(scope="module")
def emb(rich_posts: Posts, model, workdir: Path) -> Embeddings:
    return embed_posts(rich_posts, model, store=workdir / "store", show_progress=False)


@pytest.fixture(scope="module")
def emb2(rich_posts: Posts, second_model, workdir: Path) -> Embeddings:
    """The same posts in reverse row order, embedded by the second model."""
    from dataclasses import replace

    reordered = replace(rich_posts, table=rich_posts.table.reverse())
    return embed_posts(reordered, second_model, store=workdir / "store", show_progress=False)


def _coords(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2))


@pytest.fixture
def explorer(emb: Embeddings, model) -> Explorer:
    return Explorer(emb, model=model, coords=_coords(len(emb)), k=K, show_progress=False)


def _main(fig):
    return next(t for t in fig.data if t.name == "posts")


def _overlay(fig, name: str):
    return next(t for t in fig.data if t.name == name)


def _send_points(fig, event: str, point_inds: list[int], selector: dict | None = None) -> None:
    """Deliver a plotly points event exactly as the browser-side FigureWidget does."""
    trace = next(i for i, t in enumerate(fig.data) if t.name == "posts")
    msg = {
        "event_type": event,
        "points": {
            "trace_indexes": [trace] * len(point_inds),
            "point_indexes": list(point_inds),
            "xs": [0.0] * len(point_inds),
            "ys": [0.0] * len(point_inds),
        },
        "device_state": {
            "ctrl": False,
            "alt": False,
            "shift": False,
            "meta": False,
            "button": 0,
            "buttons": 0,
        },
    }
    if selector is not None:
        msg["selector"] = selector
    fig._js2py_pointsCallback = msg


# ------------------------------------------------------------------------------------------------ click
def test_click_fills_card_and_neighbors(explorer: Explorer, emb: Embeddings) -> None:
    explorer.widget  # noqa: B018 - build the panels so their widgets can be checked too
    explorer.click("p0005")
    assert explorer.current_post_id == "p0005"
    assert explorer.current_index == 5
    expected = explorer.indexes[0].image_to_texts("p0005", K)
    assert explorer.neighbors is not None
    assert explorer.neighbors["post_id"].to_list() == expected["post_id"].to_list()
    assert np.allclose(explorer.neighbors["score"].to_numpy(), expected["score"].to_numpy())
    assert explorer.neighbors["text"].to_list() == emb.posts.table["text"].gather(expected["index"]).to_list()
    # the card shows the post, its text and metadata; the widget holds the same HTML
    text = emb.posts.table["text"][5]
    assert 'data-post-id="p0005"' in explorer.card and text in explorer.card
    assert explorer.panels["card"].value == explorer.card
    assert "source" in explorer.card and "likes" in explorer.card
    # the neighbor panel lists the same posts, in order, each row's text naming its post_id
    rows = explorer.neighbor_rows()
    assert len(rows) == K
    for row, pid in zip(rows, expected["post_id"].to_list(), strict=True):
        assert "ccclip-neighbor" in row._dom_classes
        assert pid in row.children[1].description
        assert f'data-post-id="{pid}"' in row.children[2].value


def test_plotly_click_event_reaches_click(explorer: Explorer) -> None:
    fig = explorer.figures[0]
    seen: list[dict] = []
    explorer.on_click(seen.append)
    _send_points(fig, "plotly_click", [7])
    assert explorer.last_error is None
    assert explorer.current_post_id == "p0007"
    assert [p["post_id"] for p in seen] == ["p0007"] and seen[0]["index"] == 7
    # the current point and its neighbors are highlighted on the map
    cur = _overlay(fig, "current")
    assert np.allclose([cur.x[0], cur.y[0]], explorer.coords[7])
    nb = _overlay(fig, "neighbors")
    assert len(nb.x) == K
    assert np.allclose(nb.x, explorer.coords[explorer.neighbors["index"].to_numpy(), 0])
    explorer.on_click(seen.append, remove=True)
    explorer.click(3)
    assert len(seen) == 1


def test_clicking_a_neighbor_moves_there(explorer: Explorer) -> None:
    explorer.click("p0002")
    rows_before = explorer.neighbor_rows()
    target = explorer.neighbors["post_id"][2]
    explorer.neighbor_buttons()[2].click()
    assert explorer.current_post_id == target
    expected = explorer.indexes[0].image_to_texts(target, K)["post_id"].to_list()
    assert explorer.neighbors["post_id"].to_list() == expected
    rows = explorer.neighbor_rows()
    assert all(a is b for a, b in zip(rows, rows_before, strict=True))  # rows are reused, their values change
    assert [r.children[1].description.split(". ", 1)[1] for r in rows] == expected
    assert all(f'data-query="{target}"' in r.children[2].value for r in rows)
    cur = _overlay(explorer.figures[0], "current")
    assert np.allclose([cur.x[0], cur.y[0]], explorer.coords[explorer.current_index])
    assert target in explorer.panels["status"].value


# ------------------------------------------------------------------------------------------------ selection
def test_select_returns_frame_and_fires_on_select(explorer: Explorer, emb: Embeddings) -> None:
    frames: list[pl.DataFrame] = []
    explorer.on_select(frames.append)
    explorer.select([9, 3, "p0010", 3])
    sel = explorer.selection
    assert sel["post_id"].to_list() == ["p0003", "p0009", "p0010"]
    assert set(emb.posts.table.columns) <= set(sel.columns)
    assert sel["x"].dtype == pl.Float32
    assert np.allclose(sel.select("x", "y").to_numpy(), explorer.coords[[3, 9, 10]])
    assert len(frames) == 1 and frames[0].equals(sel)
    explorer.clear_selection()
    assert explorer.selection.height == 0 and len(frames) == 2
    explorer.on_select(frames.append, remove=True)
    explorer.select([1])
    assert len(frames) == 2


def test_lasso_event_selects_and_deselect_clears(explorer: Explorer) -> None:
    fig = explorer.figures[0]
    frames: list[pl.DataFrame] = []
    explorer.on_select(frames.append)
    lasso = {"type": "lasso", "selector_state": {"xs": [0, 1, 1], "ys": [0, 0, 1]}}
    _send_points(fig, "plotly_selected", [4, 11, 2], selector=lasso)
    assert explorer.last_error is None
    assert explorer.selection["post_id"].to_list() == ["p0002", "p0004", "p0011"]
    assert frames[-1]["post_id"].to_list() == ["p0002", "p0004", "p0011"]
    _send_points(fig, "plotly_deselect", [])
    assert explorer.selection.height == 0 and frames[-1].height == 0


# ------------------------------------------------------------------------------------------------ modes
def test_mode_switches_change_results(explorer: Explorer) -> None:
    explorer.click("p0008")
    idx = explorer.indexes[0]
    results = {}
    for mode in ("image_to_texts", "text_to_images", "image_to_images", "text_to_texts"):
        explorer.set_mode(mode)
        assert explorer.mode == mode
        expected = getattr(idx, mode)("p0008", K)["post_id"].to_list()
        assert explorer.neighbors["post_id"].to_list() == expected
        results[mode] = tuple(expected)
    assert len(set(results.values())) > 1
    assert "p0008" not in results["image_to_images"] and "p0008" not in results["text_to_texts"]
    # the mode menu drives the same method, and set_mode moves the menu without querying twice
    calls = []
    update = explorer._refresh_neighbors
    explorer._refresh_neighbors = lambda: (calls.append(1), update())[1]
    explorer.panels["mode"].value = "image_to_texts"
    assert explorer.neighbors["post_id"].to_list() == list(results["image_to_texts"])
    explorer.set_mode("text_to_texts")
    assert explorer.panels["mode"].value == "text_to_texts" and len(calls) == 2
    explorer.set_mode("image_to_texts")
    assert explorer.set_k(3).neighbors.height == 3 and len(explorer.neighbor_rows()) == 3


# ------------------------------------------------------------------------------------------------ search
def test_search_lists_top_images(explorer: Explorer, emb: Embeddings, model) -> None:
    explorer.widget  # noqa: B018
    explorer.search("a red circle")
    q = encode_texts(model, ["a red circle"])[0]
    scores = emb.image @ q
    expected = emb.posts.table["post_id"].gather(np.argsort(-scores, kind="stable")[:K]).to_list()
    res = explorer.search_results
    assert res is not None and res["post_id"].to_list() == expected
    assert np.allclose(res["score"].to_numpy(), np.sort(scores)[::-1][:K], atol=1e-5)
    panel = explorer.panels["search_results"]
    assert "ccclip-search-results" in panel._dom_classes
    buttons = explorer.search_buttons()
    assert [b.description.split(". ", 1)[1] for b in buttons] == expected
    assert len(_overlay(explorer.figures[0], "search").x) == K
    buttons[1].click()
    assert explorer.current_post_id == expected[1]
    # typing in the box does the same
    explorer.panels["search_input"].value = "a blue square"
    assert explorer.search_query == "a blue square"


def test_search_without_model_is_disabled(emb: Embeddings) -> None:
    ex = Explorer(emb, coords=_coords(len(emb)), show_progress=False)
    assert not ex.can_search
    with pytest.raises(RuntimeError, match="model"):
        ex.search("anything")
    assert ex.panels["search_input"].disabled and ex.panels["search_button"].disabled
    assert "Explorer(embeddings, model=model)" in ex.panels["search_note"].value


# ------------------------------------------------------------------------------------------------ colors
def test_color_by_changes_marker_arrays(explorer: Explorer, emb: Embeddings) -> None:
    fig = explorer.figures[0]
    assert explorer.color_column == "caption_kind"  # "auto" picks the caption kind
    opts = explorer.color_options
    for name in ("none", "caption_kind", "lang", "split", "cluster", "commentativeness", "likes", "source"):
        assert name in opts
    assert "neighbor_change" not in opts  # needs a second model

    codes = _main(fig).marker.color
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int32
    kinds = emb.posts.table["caption_kind"].to_list()
    cats = ["commentative", "descriptive"]
    assert [cats[c] for c in codes] == kinds
    # the legend is HTML beside the map, not a color bar on it (a hover label must never cover it)
    assert not _main(fig).marker.showscale
    legend = explorer.panels["legend"].value
    assert all(f'data-category="{c}"' in legend for c in cats)

    explorer.set_color("commentativeness")
    vals = _main(fig).marker.color
    assert vals.dtype == np.float32
    from ccclip_widgets.evaluate import commentativeness

    assert np.allclose(vals, commentativeness(emb.image, emb.text, emb.image_keys), atol=1e-6)

    explorer.panels["color"].value = "likes"  # the dropdown drives set_color
    assert explorer.color_column == "likes"
    assert _main(fig).marker.color.dtype == np.float32 and _main(fig).marker.color[3] == 21

    explorer.set_color("source")
    assert _main(fig).marker.color.dtype == np.int32 and len(set(_main(fig).marker.color)) == 3
    explorer.set_color("cluster")
    assert _main(fig).marker.color.dtype == np.int32
    explorer.set_color("none")
    assert isinstance(_main(fig).marker.color, str)
    with pytest.raises(ValueError, match="cannot color by"):
        explorer.set_color("image_bytes")


def test_coordinates_are_binary_float32(explorer: Explorer) -> None:
    from plotly.serializers import _py_to_js

    fig = explorer.figures[0]
    main = _main(fig)
    assert isinstance(main.x, np.ndarray) and main.x.dtype == np.float32
    assert isinstance(main.y, np.ndarray) and main.y.dtype == np.float32
    assert np.allclose(np.column_stack([main.x, main.y]), explorer.coords)
    sent = _py_to_js(fig._widget_data, None)
    i = list(fig.data).index(main)
    for key in ("x", "y"):
        assert isinstance(sent[i][key], dict) and "buffer" in sent[i][key], key
        assert sent[i][key]["dtype"] == "float32"
    assert sent[i]["marker"]["color"]["dtype"] == "int32"
    assert "customdata" not in sent[i]  # every post drawn: the point number is the row


def _walk_arrays(obj, found: list) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _walk_arrays(v, found)
    elif isinstance(obj, (list, tuple)):
        found.append(("list", len(obj)))
        for v in obj:
            _walk_arrays(v, found)
    elif isinstance(obj, np.ndarray):
        found.append((str(obj.dtype), obj.size))


def test_large_map_is_sampled_binary_and_listless() -> None:
    n, shown = 30_000, 5_000
    rng = np.random.default_rng(0)
    table = pl.DataFrame(
        {
            "post_id": [f"s{i}" for i in range(n)],
            "image": [f"{i}.jpg" for i in range(n)],
            "image_path": pl.Series([None] * n, dtype=pl.String),
            "image_bytes": pl.Series([None] * n, dtype=pl.Binary),
            "text": [f"text {i}" for i in range(n)],
            "image_key": [f"k{i}" for i in range(n)],
            "text_key": [f"t{i}" for i in range(n)],
            "row": np.arange(n),
            "lang": rng.choice(["en", "de", "uk"], n),
        }
    )
    vec = rng.normal(size=(n, 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    emb = Embeddings(Posts(table), vec, vec.copy(), "fp", "synthetic", pl.DataFrame())
    coords = rng.normal(size=(n, 2))
    ex = Explorer(
        emb, coords=coords, max_points=shown, hover_text_limit=1_000, color="lang", show_progress=False
    )
    assert ex.n_drawn == shown
    fig = ex.figures[0]
    main = _main(fig)
    assert len(main.x) == shown and main.customdata.dtype == np.int32
    assert main.hovertext is None  # no per-point hover texts above the limit
    assert any(t.type == "heatmap" for t in fig.data)  # density image of all posts under the sample
    found: list = []
    _walk_arrays(fig._widget_data, found)
    assert not [f for f in found if f[0] in ("int64", "uint64", "object")]
    assert max(size for kind, size in found if kind == "list") < 1_000  # nothing per point as a JSON list
    # a click on point j opens the row the sample drew there
    j = 123
    _send_points(fig, "plotly_click", [j])
    assert ex.current_index == int(main.customdata[j])
    assert np.allclose(coords[ex.current_index], [main.x[j], main.y[j]], atol=1e-6)
    # selecting rows maps them onto the drawn points; undrawn rows are kept in the selection only
    drawn = main.customdata[:3].astype(np.int64)
    hidden = np.setdiff1d(np.arange(10), main.customdata)[:2]
    ex.select(np.concatenate([drawn, hidden]))
    assert ex.selection.height == 5
    assert list(main.selectedpoints) == [0, 1, 2]
    # a box or lasso on the sampled map selects every post inside it, drawn or not
    box = {"type": "box", "selector_state": {"xrange": [0.0, 1.0], "yrange": [-0.5, 0.5]}}
    _send_points(fig, "plotly_selected", [0], selector=box)
    inside = np.flatnonzero(
        (coords[:, 0] >= 0) & (coords[:, 0] <= 1) & (coords[:, 1] >= -0.5) & (coords[:, 1] <= 0.5)
    )
    assert ex.last_error is None
    assert sorted(ex.selection["row"].to_list()) == inside.tolist()
    assert len(np.setdiff1d(inside, main.customdata)) > 0  # some of them are not drawn
    tri = {"type": "lasso", "selector_state": {"xs": [0.0, 2.0, 0.0], "ys": [0.0, 0.0, 2.0]}}
    _send_points(fig, "plotly_selected", [0], selector=tri)
    x, y = coords[:, 0], coords[:, 1]
    in_tri = np.flatnonzero((x > 0) & (y > 0) & (x + y < 2))
    assert sorted(ex.selection["row"].to_list()) == in_tri.tolist()


# ------------------------------------------------------------------------------------------------ hover
def test_thumbnails_are_made_lazily(explorer: Explorer) -> None:
    fig = explorer.figures[0]
    assert explorer._thumbs.made == 0  # building the map makes no thumbnails
    assert len(_main(fig).hovertext) == explorer.n  # small map: per-point hover texts
    _send_points(fig, "plotly_hover", [6])
    assert explorer._thumbs.made == 1
    hover = explorer.panels["hover"].value
    assert 'data-post-id="p0006"' in hover and "<img" in hover
    explorer.hover("p0006")
    assert explorer._thumbs.made == 1  # cached


# ------------------------------------------------------------------------------------------------ side by side
def test_side_by_side_links_selection_and_marks_changed(
    emb: Embeddings, emb2: Embeddings, model, second_model
) -> None:
    ex = Explorer(
        emb,
        compare=emb2,  # rows in another order: matched by post_id
        model=model,
        compare_model=second_model,
        labels=("stock", "fine-tuned"),
        coords=_coords(len(emb)),
        compare_coords=_coords(len(emb), 1),
        k=K,
        show_progress=False,
    )
    f0, f1 = ex.figures
    assert "stock" in f0.layout.title.text and "fine-tuned" in f1.layout.title.text
    # linked selection: a lasso on the left map selects the same posts on the right one
    _send_points(
        f0, "plotly_selected", [1, 5], selector={"type": "box", "selector_state": {"xrange": [0, 1]}}
    )
    assert ex.selection["post_id"].to_list() == ["p0001", "p0005"]
    assert list(_main(f1).selectedpoints) == [1, 5]
    # a click shows both models' neighbors; the second index is row-aligned with the first posts
    ex.click("p0004")
    ida = ex.indexes[0].image_to_texts("p0004", K)["post_id"].to_list()
    idb = ex.indexes[1].image_to_texts("p0004", K)["post_id"].to_list()
    assert ex.neighbors["post_id"].to_list() == ida
    assert ex.compare_neighbors["post_id"].to_list() == idb
    q2 = emb2.image[emb2.post_ids.index("p0004")]
    brute = emb2.text @ q2
    assert idb == [emb2.post_ids[i] for i in np.argsort(-brute, kind="stable")[:K]]
    assert ex.neighbors["changed"].to_list() == [p not in idb for p in ida]
    assert ex.compare_neighbors["changed"].to_list() == [p not in ida for p in idb]
    assert any(ex.neighbors["changed"])  # two different random models disagree somewhere
    for view, frame in ((0, ex.neighbors), (1, ex.compare_neighbors)):
        for row, changed in zip(ex.neighbor_rows(view), frame["changed"].to_list(), strict=True):
            assert ("ccclip-changed" in row._dom_classes) == changed
    assert "neighbors changed" in ex.card
    assert len(_overlay(f1, "current").x) == 1
    # color by how much each post's neighbors changed between the models
    assert "neighbor_change" in ex.color_options
    ex.set_color("neighbor_change")
    change = _main(f0).marker.color
    assert change.dtype == np.float32 and change.shape == (len(emb),)
    assert np.allclose(change[4], 1 - (K - sum(ex.neighbors["changed"])) / K)
    assert np.allclose(_main(f1).marker.color, change)
    # a plotly click on the right map opens the same post on both
    _send_points(f1, "plotly_click", [9])
    assert ex.current_post_id == "p0009" and len(_overlay(f0, "current").x) == 1


def test_compare_must_hold_the_same_posts(emb: Embeddings) -> None:
    fewer = Embeddings(
        emb.posts.head(10), emb.image[:10], emb.text[:10], emb.model_fingerprint, emb.model_spec, emb.rejects
    )
    with pytest.raises(ValueError, match="same posts"):
        Explorer(
            emb, compare=fewer, coords=_coords(len(emb)), compare_coords=_coords(10), show_progress=False
        )


# ------------------------------------------------------------------------------------------------ display, API
def test_widget_has_dom_hooks_and_mimebundle(explorer: Explorer) -> None:
    p = explorer.panels
    assert "ccclip-map" in explorer.figures[0]._dom_classes
    for name, cls in (
        ("card", "ccclip-card"),
        ("neighbors", "ccclip-neighbors"),
        ("search", "ccclip-search"),
    ):
        assert cls in p[name]._dom_classes
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "Explorer(24 posts" in repr(explorer)


def test_setters_chain_and_work_before_display(emb: Embeddings, model) -> None:
    ex = Explorer(emb, model=model, coords=_coords(len(emb)), show_progress=False)
    out = (
        ex.set_mode("text_to_images")
        .set_k(4)
        .set_color("lang")
        .click("p0001")
        .select([1, 2])
        .search("a circle")
    )
    assert out is ex and ex.view is None  # all state, no widgets yet
    assert ex.neighbors.height == 4 and ex.search_results.height == 4
    p = ex.panels  # built now, showing the state set before
    assert 'data-post-id="p0001"' in p["card"].value
    assert len(ex.neighbor_rows()) == 4 and len(ex.search_buttons()) == 4
    fig = ex.figures[0]  # the figure is made from the state: highlights and selection included
    assert list(_main(fig).selectedpoints) == [1, 2]
    assert len(_overlay(fig, "current").x) == 1 and len(_overlay(fig, "search").x) == 4
    assert len(_overlay(fig, "neighbors").x) == 4
    assert p["mode"].value == "text_to_images" and p["color"].value == "lang"


def test_from_posts(shape_posts: Posts, tiny_model, tmp_path: Path) -> None:
    ex = Explorer.from_posts(
        shape_posts,
        tiny_model,
        store=tmp_path / "store",
        coords=_coords(len(shape_posts)),
        show_progress=False,
    )
    assert ex.n == 24 and ex.can_search
    assert ex.color_column == "none"  # one caption kind, one language: nothing to tell apart
    assert ex.click(0).neighbors.height == 10


def test_bad_arguments(emb: Embeddings) -> None:
    with pytest.raises(ValueError, match="mode"):
        Explorer(emb, coords=_coords(len(emb)), mode="sideways")
    with pytest.raises(ValueError, match="24 x 2"):
        Explorer(emb, coords=np.zeros((3, 2)))
    ex = Explorer(emb, coords=_coords(len(emb)), show_progress=False)
    with pytest.raises(KeyError):
        ex.click("nope")
    with pytest.raises(IndexError):
        ex.select([99])


def test_coords_frame_is_matched_by_post_id(emb: Embeddings) -> None:
    xy = _coords(len(emb))
    frame = pl.DataFrame({"post_id": emb.post_ids, "x": xy[:, 0], "y": xy[:, 1]}).reverse()
    ex = Explorer(emb, coords=frame, show_progress=False)
    assert np.allclose(ex.coords, xy.astype(np.float32))


@pytest.mark.slow  # UMAP's numba compilation dominates when this runs alone
def test_default_layouts_come_from_the_projection_backend(emb: Embeddings, emb2: Embeddings) -> None:
    from ccclip_widgets import projection

    kw = {"n_epochs": 50}
    ex = Explorer(emb, compare=emb2, projection_kwargs=kw, show_progress=False)
    for xy in (ex.coords, ex.maps[1].coords):
        assert xy.shape == (len(emb), 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    expected = projection.project_posts(ex.indexes[0], kind="image", show_progress=False, **kw)
    assert np.allclose(ex.coords, expected, atol=1e-4)
    # the second map is aligned to the first: closer to it than its unaligned version would be
    raw = projection.fit_umap(ex.indexes[1].vectors("image"), show_progress=False, **kw)
    aligned_err = np.abs(ex.maps[1].coords - ex.coords).mean()
    assert aligned_err <= np.abs(projection.procrustes_align(raw, ex.coords) - ex.coords).mean() * 1.5
    # both layouts are cached by fingerprint: a second Explorer reuses them
    again = Explorer(emb, compare=emb2, projection_kwargs=kw, show_progress=False)
    assert np.array_equal(again.coords, ex.coords)
    assert np.array_equal(again.maps[1].coords, ex.maps[1].coords)


# ------------------------------------------------------------------------------------------------ helpers
def test_common_helpers(rich_posts: Posts) -> None:
    post = rich_posts.table.row(0, named=True)
    cache = ThumbnailCache(maxsize=2)
    tag = cache.img_html(post, 32)
    assert tag.startswith("<img") and "data:image/webp;base64," in tag and cache.made == 1
    cache.img_html(post, 32)
    assert cache.made == 1
    missing = cache.img_html({"post_id": "x", "image_key": "none"}, 32)
    assert "ccclip-thumb-missing" in missing
    html = post_card_html({**post, "text": "<b>hi</b> & bye"}, extra={"score": 0.5})
    assert "&lt;b&gt;hi&lt;/b&gt; &amp; bye" in html and "image_bytes" not in html and "score" in html
    assert truncate("a  b   c", 3) == "a\u2026"
    assert truncate("short", 10) == "short"


def test_missing_dependency_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccclip_widgets.widgets import _common

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    with pytest.raises(ImportError) as info:
        _common.require_widgets()
    assert INSTALL_HINT in str(info.value) and INSTALL_HINT == 'pip install "ccclip_widgets[widgets]"'


def test_importing_the_explorer_loads_no_widget_library() -> None:
    code = (
        "import sys, ccclip_widgets.widgets as w; from ccclip_widgets.widgets import explorer; "
        "assert w.Explorer is explorer.Explorer; "
        "bad = [m for m in ('ipywidgets', 'plotly') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ issue 13 view
def test_side_panel_puts_the_card_first_and_search_under_its_heading(explorer: Explorer, model) -> None:
    p = explorer.panels
    side = p["side"].children
    assert side.index(p["card"]) < side.index(p["neighbors"]) < side.index(p["search_results"])
    assert p["search_results"].layout.display == "none"  # nothing searched: no empty heading
    explorer.click("p0003").search("a red circle")
    assert "Search results" in p["search_heading"].value and "a red circle" in p["search_heading"].value
    assert p["search_results"].layout.display is None and len(explorer.search_buttons()) == K
    p["search_clear"].click()
    assert explorer.search_results is None and p["search_results"].layout.display == "none"
    assert explorer.current_post_id == "p0003"  # clearing the search keeps the open post
    assert "Neighbors" in p["neighbor_heading"].value


def test_neighbor_filter_menu_is_one_choice(explorer: Explorer, emb: Embeddings) -> None:
    p = explorer.panels
    labels = [lbl for lbl, _ in p["neighbor_filter"].options]
    assert "commentative \u00b7 de" in labels and "any post" in labels
    explorer.click("p0004")
    p["neighbor_filter"].value = labels.index("commentative \u00b7 de")
    assert explorer.neighbor_filter == {"caption_kind": ["commentative"], "lang": ["de"]}
    table = emb.posts.table
    got = explorer.neighbors["index"]
    assert set(table["caption_kind"].gather(got)) == {"commentative"} and set(table["lang"].gather(got)) == {
        "de"
    }
    assert [r.children[2].value.count('data-post-id="') for r in explorer.neighbor_rows()] == [1] * got.len()
    assert "only" in p["neighbor_heading"].value
    explorer.set_filter(caption_kind="descriptive")  # code moves the menu
    assert p["neighbor_filter"].label == "descriptive"
    explorer.set_filter()
    assert p["neighbor_filter"].value == 0


def test_map_filter_controls_fade_points(explorer: Explorer) -> None:
    p = explorer.panels
    fig = explorer.figures[0]
    p["map_filter_column"].value = "lang"
    assert p["map_filter_values"].layout.display is None and set(p["map_filter_values"].options) == {
        "de",
        "en",
    }
    p["map_filter_values"].value = ("de",)
    assert explorer.map_filter == {"lang": ["de"]}
    op = _main(fig).marker.opacity
    assert isinstance(op, np.ndarray) and op.dtype == np.float32
    de = (explorer.posts["lang"] == "de").to_numpy()
    assert (op[de] > 0.5).all() and (op[~de] < 0.1).all()
    assert "match the map filter" in p["status"].value
    _send_points(fig, "plotly_selected", list(range(24)), selector={"type": "box", "selector_state": {}})
    assert set(explorer.selection["lang"]) == {"de"}
    p["map_filter_column"].value = "likes"
    assert p["map_filter_range"].layout.display is None
    p["map_filter_range"].value = (21.0, 70.0)
    assert explorer.map_filter["likes"] == (21.0, 70.0)
    p["map_filter_clear"].click()
    assert explorer.visible is None and not isinstance(_main(fig).marker.opacity, np.ndarray)


def test_cluster_labels_toggle_annotations(explorer: Explorer) -> None:
    fig = explorer.figures[0]
    assert len(fig.layout.annotations) == 0
    explorer.panels["clusters"].value = True
    assert explorer.show_clusters and len(fig.layout.annotations) == explorer.clusters.height
    explorer.set_cluster_labels(False)
    assert len(fig.layout.annotations) == 0 and explorer.panels["clusters"].value is False


def test_changes_panel_with_two_models(emb: Embeddings, emb2: Embeddings, model, second_model) -> None:
    ex = Explorer(
        emb,
        compare=emb2,
        model=model,
        compare_model=second_model,
        coords=_coords(len(emb)),
        compare_coords=_coords(len(emb), 1),
        k=K,
        show_progress=False,
    )
    p = ex.panels
    ex.click("p0006")
    table = p["rank_changes"].value
    assert "ccclip-rank-table" in table and all(
        f'data-post-id="{pid}"' in table for pid in ex.neighbors["post_id"]
    )
    assert all("other model:" in r.children[2].value for r in ex.neighbor_rows())
    p["moved_button"].click()
    moved = p["moved_list"].children[1:]
    assert len(moved) == 15 and "rank of own image" in moved[0].children[2].value
    first = ex.text_shift()["post_id"][0]
    assert first in moved[0].children[1].description
    moved[0].children[1].click()
    assert ex.current_post_id == first


def test_hover_preview_is_no_wider_than_the_maps(emb: Embeddings) -> None:
    """A long hovered text wraps under the map instead of widening the map column (which pushed the side panel
    out of the notebook in the full-demo browser test)."""
    ex = Explorer(emb, coords=_coords(len(emb)), map_width=300, show_progress=False)
    assert ex.panels["hover"].layout.max_width == "300px"
    two = Explorer(
        emb, compare=emb, coords=_coords(len(emb)), compare_coords=_coords(len(emb)), show_progress=False
    )
    assert two.panels["hover"].layout.max_width == "920px"
