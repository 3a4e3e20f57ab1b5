"""Real-browser tests: the tutorial notebooks run in JupyterLab (headless Chromium) and their widgets work.

Each test opens a notebook in a workspace of its own, runs every cell from the Run menu, waits for the kernel,
then checks the widgets in the DOM (and, through them, the kernel's state): the Explorer's map draws and a click on
a point opens that post with its neighbors; the Gap chart shows both caption kinds; the FineTune panel's Start
button runs a short fine-tune to the end. Screenshots go to each test's ``tmp_path``, the best ones to ``docs/img``.

Run with ``pytest tests/browser`` (needs Debian's ``/usr/bin/chromium``); they take a few minutes on 2 cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

pytestmark = pytest.mark.browser

DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
KERNEL_TIMEOUT_MS = 180_000
RUN_TIMEOUT_MS = 600_000

_RUN_STATE_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')]
    .map(p => p.textContent.trim());
  const idle = !!document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='idle']");
  const errors = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]
    .filter(c => /Traceback|Error\\b.*\\n/.test(c.querySelector('.jp-OutputArea')?.innerText || '')
                 && c.querySelector("[data-mime-type='application/vnd.jupyter.stderr']"))
    .map(c => c.innerText.slice(-1500));
  return {prompts, idle, errors};
}"""


def _open_notebook(page: Any, lab: Any, notebook: str) -> None:
    """Open a notebook in a fresh workspace and wait until its kernel is idle."""
    page.goto(lab.notebook_url(notebook), timeout=KERNEL_TIMEOUT_MS)
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=KERNEL_TIMEOUT_MS)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=KERNEL_TIMEOUT_MS)
    time.sleep(2.0)
    select = page.locator(".jp-Dialog button:has-text('Select')")
    if select.count():  # a kernel chooser, when the notebook's kernel is not known
        select.first.click()
        page.wait_for_selector(
            ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=KERNEL_TIMEOUT_MS
        )


def _run_all(page: Any, notebook: str) -> None:
    """Run all cells from the Run menu; wait until every code cell has an execution count (fail on an error)."""
    started = "() => [...document.querySelectorAll('.jp-Notebook .jp-InputArea-prompt')].some(p => p.textContent.includes('*'))"
    for attempt in range(3):  # on a loaded machine the first click can land before the kernel is ready
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(started, timeout=45_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
            time.sleep(2.0)
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while True:
        state = page.evaluate(_RUN_STATE_JS)
        busy = any("*" in p for p in state["prompts"])
        done = all(p[1:-2].strip().isdigit() for p in state["prompts"])
        if not busy and state["idle"] and (done or state["errors"]):
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"{notebook}: cells still running after {RUN_TIMEOUT_MS // 1000} s: {state['prompts']}"
            )
        time.sleep(1.0)
    if state["errors"] or not done:
        pytest.fail(
            f"{notebook}: Run All stopped at an error. Prompts: {state['prompts']}\n"
            + "\n----\n".join(state["errors"])
        )
    body = page.locator(".jp-Notebook").inner_text()
    assert "Error displaying widget" not in body, f"{notebook}: a widget failed to display"


def _check_console(page: Any, notebook: str) -> None:
    console = page.console
    assert not console.widget_errors(), f"{notebook}: widget errors in the browser: {console.widget_errors()}"


def _shot(page: Any, selector: str, *paths: Path) -> None:
    """Screenshot one element to every path, in a viewport tall enough to show all of it, without toasts."""
    page.evaluate("() => document.querySelectorAll('.Toastify').forEach(e => e.remove())")
    page.mouse.move(1, 1)  # no hover label over the picture
    el = page.locator(selector).first
    size = page.viewport_size
    height = int(el.evaluate("e => e.getBoundingClientRect().height"))
    width = int(el.evaluate("e => e.scrollWidth"))  # wide widgets overflow the notebook panel
    page.set_viewport_size(
        {"width": max(size["width"], width + 520), "height": max(size["height"], height + 300)}
    )
    try:
        el.scroll_into_view_if_needed()
        time.sleep(1.0)
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            el.screenshot(path=str(path))
    finally:
        page.set_viewport_size(size)


# In the page: the Explorer map's graph div, and a well separated point of its "posts" trace (not already
# marked as the open post or a neighbor), with its screen position and post id (hover texts read "<id>: <text>").
_PICK_POINT_JS = """() => {
  let gd = document.querySelector('.ccclip-map');
  if (gd && !gd._fullLayout) gd = gd.querySelector('.js-plotly-plot');
  const fl = gd._fullLayout;
  const ti = gd.data.findIndex(t => t.name === 'posts');
  const tr = gd.data[ti >= 0 ? ti : 0];
  const card = document.querySelector('.ccclip-card .ccclip-card-body');
  const open = card ? card.dataset.postId : null;
  const listed = new Set([...document.querySelectorAll('.ccclip-neighbors .ccclip-neighbor-text')]
    .map(e => e.dataset.postId));
  const r = gd.getBoundingClientRect();
  const pts = [];
  for (let i = 0; i < tr.x.length; i++) {
    const p = {i, x: r.left + fl.xaxis._offset + fl.xaxis.l2p(tr.x[i]),
               y: r.top + fl.yaxis._offset + fl.yaxis.l2p(tr.y[i]),
               id: String(tr.hovertext ? tr.hovertext[i] : '').split(':')[0]};
    if (p.x > 20 && p.y > 60 && p.x < window.innerWidth - 20 && p.y < window.innerHeight - 20) pts.push(p);
  }
  let best = null, bestGap = -1;
  for (const p of pts) {
    if (!p.id || p.id === open || listed.has(p.id)) continue;
    let gap = Infinity;
    for (const q of pts) if (q !== p) gap = Math.min(gap, Math.hypot(p.x - q.x, p.y - q.y));
    if (gap > bestGap) { best = p; bestGap = gap; }
  }
  return {point: best, open, n: pts.length};
}"""


def test_explorer_click_shows_neighbors(page: Any, lab: Any, tmp_path: Path) -> None:
    nb = "notebooks/01_explore.ipynb"
    _open_notebook(page, lab, nb)
    _run_all(page, nb)

    page.wait_for_selector(
        ".ccclip-explorer .ccclip-map .main-svg", state="attached", timeout=KERNEL_TIMEOUT_MS
    )
    page.locator(".ccclip-explorer").first.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => { const c = document.querySelector('.ccclip-map canvas.gl-canvas-context');"
        " return !!c && c.width > 0 && c.height > 0; }",
        timeout=KERNEL_TIMEOUT_MS,
    )
    plot = page.locator(".ccclip-map").first
    plot.scroll_into_view_if_needed()
    time.sleep(1.0)
    picked = page.evaluate(_PICK_POINT_JS)
    point = picked["point"]
    assert point is not None, f"no clickable point found on the map ({picked})"
    assert picked["n"] > 1

    page.mouse.move(point["x"] - 3, point["y"] - 3)
    page.mouse.move(point["x"], point["y"])
    page.wait_for_selector(".hoverlayer .hovertext", timeout=30_000)
    time.sleep(0.3)
    page.mouse.click(point["x"], point["y"])

    # The kernel answers the click: the card opens the clicked post (the lists are filled before the card).
    page.wait_for_function(
        "(id) => { const c = document.querySelector('.ccclip-card .ccclip-card-body');"
        " return !!c && c.dataset.postId === id; }",
        arg=point["id"],
        timeout=60_000,
    )
    rows = page.locator(".ccclip-neighbors .ccclip-neighbor-text")
    assert rows.count() > 0, "the neighbor panel lists no posts"
    queries = {rows.nth(i).get_attribute("data-query") for i in range(rows.count())}
    ids = [rows.nth(i).get_attribute("data-post-id") for i in range(rows.count())]
    assert all(ids), f"neighbor rows without post ids: {ids}"
    assert queries == {point["id"]}, f"neighbor rows answer {queries}, not the clicked post {point['id']}"
    buttons = page.locator(".ccclip-neighbors .ccclip-neighbor-button").all_inner_texts()
    assert buttons and buttons[0].strip().startswith("1."), buttons
    assert ids[0] in buttons[0]
    status = page.locator(".ccclip-status").first.inner_text()
    assert point["id"] in status, f"status line does not name the open post: {status!r}"

    _shot(
        page, ".ccclip-explorer", tmp_path / "explorer.png"
    )  # the README's picture is of the full demo (below)
    page.screenshot(path=str(tmp_path / "explorer-page.png"))
    _check_console(page, nb)


def _click_point_in_view(page: Any) -> dict:
    """Hover and click a well separated point that lies inside the window; return it (with its post id)."""
    plot = page.locator(".ccclip-map").first
    plot.evaluate("e => e.scrollIntoView({block: 'center'})")
    time.sleep(1.0)
    picked = page.evaluate(_PICK_POINT_JS)
    point = picked["point"]
    assert point is not None, f"no clickable point found on the map ({picked})"
    page.mouse.move(point["x"] - 3, point["y"] - 3)
    page.mouse.move(point["x"], point["y"])
    page.wait_for_selector(".hoverlayer .hovertext", timeout=30_000)
    time.sleep(0.3)
    before = page.evaluate(
        "() => { const c = document.querySelector('.ccclip-card .ccclip-card-body'); return c ? c.dataset.postId : null; }"
    )
    page.mouse.click(point["x"], point["y"])
    # Posts that share an image share a point on an image map: the click opens the one that fits the filters and
    # color (ExplorerState.point_post), not necessarily the one under the pointer
    page.wait_for_function(
        "([id, before]) => { const c = document.querySelector('.ccclip-card .ccclip-card-body');"
        " return !!c && (c.dataset.postId === id || c.dataset.postId !== before); }",
        arg=[point["id"], before],
        timeout=60_000,
    )
    point["id"] = page.locator(".ccclip-card .ccclip-card-body").first.get_attribute("data-post-id")
    return point


def _assert_in_window(page: Any, selector: str, size: dict) -> dict:
    deadline = time.monotonic() + 5.0  # let the panel finish reflowing after the click
    while True:
        box = page.locator(selector).first.bounding_box()
        inside = box is not None and box["x"] >= 0 and box["x"] + box["width"] <= size["width"] + 1
        if inside or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert box is not None, f"{selector} is not shown"
    assert box["x"] >= 0 and box["y"] >= 0, f"{selector} starts outside the window: {box}"
    assert box["x"] + box["width"] <= size["width"] + 1, (
        f"{selector} is cut off on the right: {box} in {size}"
    )
    assert box["y"] + box["height"] <= size["height"] + 1, f"{selector} is below the window: {box} in {size}"
    return box


def test_explorer_full_demo_card_in_view_and_commentative_filter(
    page: Any, lab_full: Any, tmp_path: Path
) -> None:
    """On the full demo: at 1280x760 and 1600x1000 a click opens a card that is inside the window (side panel not
    cut off), the card lists the image's four other posts and opens one on a click, the neighbor filter lists only
    commentative posts, and Run All leaves nothing selected."""
    nb = "notebooks/01_explore.ipynb"
    _open_notebook(page, lab_full, nb)
    _run_all(page, nb)
    page.wait_for_selector(
        ".ccclip-explorer .ccclip-map .main-svg", state="attached", timeout=KERNEL_TIMEOUT_MS
    )
    page.wait_for_function(
        "() => { const c = document.querySelector('.ccclip-map canvas.gl-canvas-context');"
        " return !!c && c.width > 0 && c.height > 0; }",
        timeout=KERNEL_TIMEOUT_MS,
    )
    page.locator(".ccclip-map").first.evaluate("e => e.scrollIntoView({block: 'center'})")
    time.sleep(1.0)  # JupyterLab renders cells lazily: read the widget once it is in view
    status = page.locator(".ccclip-status").first.inner_text()
    assert "8,000 posts" in status and " 0 selected" in status, (
        f"Run All left a selection (or not the full demo): {status!r}"
    )
    assert page.locator(".ccclip-progress-line").first.inner_text().count("ready") == 1

    for size, shot in (
        ({"width": 1280, "height": 760}, DOCS_IMG / "explorer-1280.png"),
        ({"width": 1600, "height": 1000}, None),
    ):
        page.set_viewport_size(size)
        time.sleep(1.5)
        point = _click_point_in_view(page)
        _assert_in_window(page, ".ccclip-card .ccclip-card-body", size)
        side = page.locator(".ccclip-side").first.bounding_box()
        panel = page.locator(".jp-NotebookPanel").first.bounding_box()
        assert side["x"] + side["width"] <= min(size["width"], panel["x"] + panel["width"]) + 1, (
            side,
            panel,
            size,
        )
        rows = page.locator(".ccclip-neighbors .ccclip-neighbor-text")
        assert rows.count() > 0
        assert {rows.nth(i).get_attribute("data-query") for i in range(rows.count())} == {point["id"]}
        assert rows.first.is_visible() and rows.first.bounding_box()["height"] > 10, "neighbor rows collapsed"
        if shot is not None:
            page.evaluate("() => document.querySelectorAll('.Toastify').forEach(e => e.remove())")
            page.mouse.move(1, 1)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            page.screenshot(path=str(tmp_path / shot.name))

    # the card lists the other posts of the open post's image (the demo posts each image five times); a click on
    # one opens it
    heading = page.locator(".ccclip-same-image .ccclip-same-image-heading").first
    assert heading.get_attribute("data-count") == "4", heading.inner_text()
    entries = page.locator(".ccclip-same-image .ccclip-same-image-text")
    assert entries.count() == 4 and entries.first.is_visible()
    target = entries.nth(1).get_attribute("data-post-id")
    assert target != point["id"] and target.split("-")[:2] == point["id"].split("-")[:2], (target, point)
    page.locator(".ccclip-same-image .ccclip-same-image-button").nth(1).click()
    page.wait_for_function(
        "(id) => { const c = document.querySelector('.ccclip-card .ccclip-card-body');"
        " return !!c && c.dataset.postId === id; }",
        arg=target,
        timeout=60_000,
    )

    # the neighbor filter: "commentative" in the menu, every listed neighbor is a commentative post
    select = page.locator(".ccclip-neighbor-filter select").first
    select.select_option(label="commentative")
    page.wait_for_function(
        "() => { const r = [...document.querySelectorAll('.ccclip-neighbors .ccclip-neighbor-text')];"
        " return r.length > 0 && r.every(e => e.dataset.postId.includes('-com-')); }",
        timeout=60_000,
    )
    heading = page.locator(".ccclip-neighbors").first.inner_text()
    assert "commentative" in heading, heading
    time.sleep(2.0)
    labels_js = "() => document.querySelectorAll('.ccclip-map .annotation-text').length"
    if page.evaluate(labels_js) <= 2:  # the notebook turns the cluster labels on; make sure, for the picture
        page.locator(".ccclip-clusters").first.click()
    page.wait_for_function(
        "() => document.querySelectorAll('.ccclip-map .annotation-text').length > 2", timeout=60_000
    )
    _shot(page, ".ccclip-explorer", tmp_path / "explorer.png", DOCS_IMG / "explorer.png")
    _check_console(page, nb)


# The Gap and FineTune tests moved to test_lab_training.py (with the interrupt test and the full-demo Gap).
