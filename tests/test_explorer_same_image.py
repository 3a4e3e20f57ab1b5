"""Posts that share an image: the card's "Same image, N other posts" list and which post a click on their common
map point opens. The state is driven without any widget; the view is inspected through its widgets' values.

The table interleaves the posts of each image with others, so "the table's order" is not the same as "adjacent".
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.embed import Embeddings
from ccclip_widgets.posts import Posts
from ccclip_widgets.widgets.explorer_state import ExplorerState

REPO = Path(__file__).resolve().parents[1]
HTML_TEXT = '<b>bold</b> & "quoted" <script>alert(1)</script>'

# post_id, image, lang, caption_kind. Image A: five posts (two in German) stacked on one point; U: one post;
# S: two posts far apart on the map (as on a text map); E: twelve posts stacked on one point (more than the cap).
_A = [
    (0, "a-desc-en", "en", "descriptive"),
    (2, "a-com-uk", "uk", "commentative"),
    (4, "a-com-de", "de", "commentative"),
    (6, "a-com-en", "en", "commentative"),
    (19, "a-desc-de", "de", "descriptive"),
]
A_ROWS = [r for r, *_ in _A]
E_ROWS = list(range(7, 19))


def _records() -> list[tuple[str, str, str, str]]:
    rows: dict[int, tuple[str, str, str, str]] = {r: (pid, "A", lang, kind) for r, pid, lang, kind in _A}
    rows[1] = ("u-desc-en", "U", "en", "descriptive")
    rows[3] = ("s-desc-en", "S", "en", "descriptive")
    rows[5] = ("s-com-uk", "S", "uk", "commentative")
    langs = ["en", "uk", "es", "de"]
    for j, r in enumerate(E_ROWS):
        rows[r] = (f"e-{j:02d}", "E", langs[j % 4], "commentative" if j % 2 else "descriptive")
    return [rows[r] for r in range(len(rows))]


def _coords(n: int) -> np.ndarray:
    """Posts of A and of E stacked (jitter far below the stack tolerance), S's two posts apart, U alone."""
    xy = np.zeros((n, 2), np.float32)
    jitter = 1e-4 * np.arange(n, dtype=np.float32)
    for r in A_ROWS:
        xy[r] = (0.0 + jitter[r], 0.0)
    xy[1] = (5.0, 5.0)
    xy[3], xy[5] = (-5.0, 0.0), (-5.0, 4.0)
    for r in E_ROWS:
        xy[r] = (5.0, -5.0 + jitter[r])
    return xy


def shared_embeddings(with_kind_columns: bool = True) -> Embeddings:
    """20 posts over 4 images; posts of one image share their image vector (as embedding makes them)."""
    recs = _records()
    n = len(recs)
    keys = [img for _, img, _, _ in recs]
    texts = [f"text of {pid}" for pid, *_ in recs]
    texts[2] = HTML_TEXT
    texts[6] = "a long commentative caption " * 10
    cols: dict[str, object] = {
        "post_id": [pid for pid, *_ in recs],
        "image": [f"{k}.png" for k in keys],
        "image_path": pl.Series([None] * n, dtype=pl.String),
        "image_bytes": pl.Series([None] * n, dtype=pl.Binary),
        "text": texts,
        "image_key": [f"key-{k}" for k in keys],
        "text_key": [f"t{i}" for i in range(n)],
        "row": np.arange(n),
        "likes": np.arange(n) * 10.0,
    }
    if with_kind_columns:
        cols["lang"] = [lang for _, _, lang, _ in recs]
        cols["caption_kind"] = [kind for *_, kind in recs]
    rng = np.random.default_rng(0)
    per_image = {k: rng.normal(size=16) for k in "AUSE"}
    img = np.stack([per_image[k] for k in keys]).astype(np.float32)
    txt = rng.normal(size=(n, 16)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return Embeddings(Posts(pl.DataFrame(cols)), img, txt, "fp-shared", "synthetic", pl.DataFrame())


@pytest.fixture(scope="module")
def emb() -> Embeddings:
    return shared_embeddings()


@pytest.fixture
def state(emb: Embeddings) -> ExplorerState:
    return ExplorerState(emb, coords=_coords(len(emb)), color="none", k=3, show_progress=False)


# ------------------------------------------------------------------------------------------------ the list
def test_lists_the_other_posts_of_the_image_in_table_order(state: ExplorerState, emb: Embeddings) -> None:
    assert state.same_image_posts().height == 0 and state.same_image_count() == 0  # nothing open yet
    state.click("a-com-de")
    frame = state.same_image_posts()
    assert frame.columns == ["index", "post_id", "lang", "caption_kind", "text"]
    assert frame["index"].to_list() == [0, 2, 6, 19]  # the table's order, the open post left out
    assert frame["post_id"].to_list() == ["a-desc-en", "a-com-uk", "a-com-en", "a-desc-de"]
    assert frame["lang"].to_list() == ["en", "uk", "en", "de"]
    assert frame["caption_kind"].to_list() == ["descriptive", "commentative", "commentative", "descriptive"]
    assert frame["text"].to_list() == emb.posts.table["text"].gather([0, 2, 6, 19]).to_list()
    assert state.same_image_count() == 4
    # any post can be asked about, by id or row, without opening it
    assert state.same_image_posts(19)["post_id"].to_list() == [
        "a-desc-en",
        "a-com-uk",
        "a-com-de",
        "a-com-en",
    ]
    assert state.same_image_count("s-com-uk") == 1
    assert state.same_image_posts("s-com-uk")["post_id"].to_list() == ["s-desc-en"]
    assert state.current_post_id == "a-com-de"  # asking moved nothing


def test_the_list_is_capped_but_counts_them_all(state: ExplorerState) -> None:
    state.click("e-05")
    assert state.same_image_count() == 11
    capped = state.same_image_posts(limit=state.same_image_limit)
    assert state.same_image_limit == 8
    assert capped["index"].to_list() == [r for r in E_ROWS if r != E_ROWS[5]][:8]
    assert state.same_image_posts().height == 11
    assert state.same_image_posts(limit=0).height == 0


def test_a_post_with_its_own_image_lists_nothing(state: ExplorerState) -> None:
    state.click("u-desc-en")
    assert state.same_image_count() == 0
    frame = state.same_image_posts()
    assert frame.height == 0 and frame.columns == ["index", "post_id", "lang", "caption_kind", "text"]


def test_without_language_and_kind_columns_the_list_has_id_and_text() -> None:
    emb = shared_embeddings(with_kind_columns=False)
    st = ExplorerState(emb, coords=_coords(len(emb)), show_progress=False).click(0)
    frame = st.same_image_posts()
    assert frame.columns == ["index", "post_id", "text"] and frame["index"].to_list() == [2, 4, 6, 19]


# ------------------------------------------------------------------------------------------------ map clicks
def test_map_click_without_filters_opens_the_first_post_of_the_image(state: ExplorerState) -> None:
    for clicked in A_ROWS:
        assert state.point_post(clicked) == 0
    seen: list[str] = []
    state.on_click(lambda post: seen.append(post["post_id"]))
    state.click_point(19)
    assert state.current_post_id == "a-desc-en" and seen == ["a-desc-en"]
    # a post alone on its point opens as it is, whatever the filters say
    state.set_map_filter("lang", "en")
    assert state.point_post("s-com-uk") == 5 and state.point_post("u-desc-en") == 1
    # code (and the neighbor and same-image buttons) still opens exactly the post it names
    state.click("a-com-de")
    assert state.current_post_id == "a-com-de"


def test_map_click_prefers_the_map_filter_then_the_neighbor_filter_then_the_color(
    state: ExplorerState,
) -> None:
    state.set_map_filter("lang", "uk")
    assert [state.point_post(r) for r in A_ROWS] == [2] * 5  # the only bright post of the point
    state.set_map_filter("lang", "es")  # no post of A passes: the rule is skipped
    assert state.point_post(4) == 0
    state.clear_map_filters().set_filter(caption_kind="commentative")
    assert state.point_post(19) == 2  # the first commentative post of the image
    state.set_map_filter("lang", "de")  # the map filter outranks the neighbor filter
    assert state.point_post(0) == 4
    state.set_filter(caption_kind="descriptive")
    assert state.point_post(0) == 19
    state.set_map_filter("lang", "uk")  # they disagree: the bright post wins over the filtered kind
    assert state.point_post(19) == 2
    state.clear_map_filters().set_filter()
    # color: the point shows the color of its post drawn last (row 19: German, descriptive); the click opens the
    # first post with that color, whichever post the browser reported
    state.set_color("lang")
    assert [state.point_post(r) for r in A_ROWS] == [4] * 5
    state.set_color("caption_kind").set_map_filter("lang", ["en", "uk"])  # bright: 0, 2, 6; drawn last: 6
    assert [state.point_post(r) for r in A_ROWS] == [2] * 5  # the first bright commentative post
    state.clear_map_filters().set_filter(caption_kind="commentative").set_color("lang")
    assert state.point_post(0) == 4  # commentative first, then German
    state.set_filter(lang="uk")  # they disagree: the filter wins over the color
    assert state.point_post(19) == 2
    state.set_filter().set_color("likes")  # a value per post: only the post drawn last has the point's color
    assert [state.point_post(r) for r in A_ROWS] == [19] * 5


def test_stacks_are_per_map(emb: Embeddings) -> None:
    """With two maps, a click on the second map looks at which posts share a point there."""
    apart = _coords(len(emb))
    apart[A_ROWS] = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]], np.float32)
    st = ExplorerState(
        emb, compare=emb, coords=_coords(len(emb)), compare_coords=apart, color="none", show_progress=False
    )
    assert st.point_post(4, view=0) == 0
    assert st.point_post(4, view=1) == 4
    st.click_point(19, view=1)
    assert st.current_post_id == "a-desc-de" and st.same_image_count() == 4


def test_the_logic_needs_no_widget_library() -> None:
    code = (
        "import sys; sys.path.insert(0, 'tests'); "
        "from test_explorer_same_image import shared_embeddings, _coords; "
        "from ccclip_widgets.widgets.explorer_state import ExplorerState; "
        "e = shared_embeddings(); st = ExplorerState(e, coords=_coords(len(e)), color='none', show_progress=False); "
        "st.click_point(4); assert st.current_post_id == 'a-desc-en', st.current_post_id; "
        "assert st.same_image_posts()['index'].to_list() == [2, 4, 6, 19]; "
        "bad = [m for m in ('ipywidgets', 'plotly', 'IPython') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=REPO)


# ------------------------------------------------------------------------------------------------ the view
@pytest.fixture
def explorer(emb: Embeddings):
    pytest.importorskip("ipywidgets")
    pytest.importorskip("plotly")
    from ccclip_widgets.widgets import Explorer

    ex = Explorer(emb, coords=_coords(len(emb)), color="none", k=3, show_progress=False)
    ex.widget  # noqa: B018 - build the view
    return ex


def _texts(ex) -> list[str]:
    return [row.children[1].value for row in ex.panels["same_image"].children[1:-1]]


def _post_id(html: str) -> str:
    return re.search(r'data-post-id="([^"]*)"', html).group(1)


def test_card_lists_the_same_image_posts_and_a_click_moves_there(explorer) -> None:
    from ccclip_widgets.widgets._common import truncate

    p = explorer.panels
    side = p["side"].children
    assert side.index(p["card"]) + 1 == side.index(p["same_image"])  # right under the card
    assert p["same_image"].layout.display == "none"  # nothing open
    explorer.click("a-com-de")
    panel = p["same_image"]
    assert panel.layout.display is None and "ccclip-same-image" in panel._dom_classes
    heading = panel.children[0].value
    assert 'data-count="4"' in heading and "Same image" in heading and "4 other posts" in heading
    buttons = explorer.same_image_buttons()
    assert [b.description for b in buttons] == [
        "en \u00b7 descriptive",
        "uk \u00b7 commentative",
        "en \u00b7 commentative",
        "de \u00b7 descriptive",
    ]
    texts = _texts(explorer)
    ids = ["a-desc-en", "a-com-uk", "a-com-en", "a-desc-de"]
    assert [_post_id(t) for t in texts] == ids
    # the text is shortened and escaped
    long_text = explorer.posts["text"][6]
    assert truncate(long_text, 90) in texts[2] and long_text.strip() not in texts[2]
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &lt;script&gt;" in texts[1]
    assert "<script>" not in texts[1] and "<b>bold" not in texts[1]
    assert panel.children[-1].value == ""  # nothing left out: no "+k more"
    # a click on an entry opens that post; the list then holds the others, the previous post included
    buttons[1].click()
    assert explorer.current_post_id == "a-com-uk"
    assert 'data-post-id="a-com-uk"' in p["card"].value
    assert [b.description for b in explorer.same_image_buttons()][:3] == [
        "en \u00b7 descriptive",
        "de \u00b7 commentative",
        "en \u00b7 commentative",
    ]
    assert [_post_id(t) for t in _texts(explorer)] == ["a-desc-en", "a-com-de", "a-com-en", "a-desc-de"]
    # the card's own text is escaped too
    assert "<script>" not in p["card"].value and "&lt;script&gt;" in p["card"].value


def test_the_view_caps_the_list_with_a_more_note(explorer) -> None:
    explorer.click("e-00")
    panel = explorer.panels["same_image"]
    assert len(explorer.same_image_buttons()) == 8
    assert 'data-count="11"' in panel.children[0].value
    more = panel.children[-1].value
    assert 'data-more="3"' in more and "+3 more" in more
    assert [_post_id(t) for t in _texts(explorer)] == [f"e-{j:02d}" for j in range(1, 9)]
    explorer.click("a-com-de")  # a shorter list reuses the rows and drops the note
    assert len(explorer.same_image_buttons()) == 4 and panel.children[-1].value == ""


def test_a_post_alone_on_its_image_shows_no_list(explorer) -> None:
    explorer.click("a-com-de").click("u-desc-en")
    assert explorer.panels["same_image"].layout.display == "none"
    assert explorer.same_image_buttons() == []
    explorer.click("a-com-de").close_post()
    assert explorer.panels["same_image"].layout.display == "none"


def test_a_plotly_click_on_a_shared_point_opens_the_fitting_post(explorer) -> None:
    from test_widget_explorer import _send_points

    fig = explorer.figures[0]
    _send_points(fig, "plotly_click", [19])  # the browser reports the German descriptive post
    assert explorer.last_error is None and explorer.current_post_id == "a-desc-en"
    assert "a-desc-de" in [_post_id(t) for t in _texts(explorer)]  # ...which the card lists
    explorer.set_map_filter("lang", "uk")
    _send_points(fig, "plotly_click", [0])
    assert explorer.current_post_id == "a-com-uk"
    _send_points(fig, "plotly_hover", [19])  # hovering still previews the reported post
    assert 'data-post-id="a-desc-de"' in explorer.panels["hover"].value
    _send_points(fig, "plotly_click", [5])  # alone on its point
    assert explorer.current_post_id == "s-com-uk"
