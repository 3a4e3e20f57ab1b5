"""Kernel-side cost of drawing the Explorer map at 10k, 100k and 1M synthetic posts.

For each size, in a fresh subprocess (so peak memory is per size), it measures:

* ``import``: the first import of plotly's ``FigureWidget`` (paid once per kernel; plotly pulls in nbformat and
  jsonschema);
* ``build``: ``Explorer(...).widget`` with precomputed coordinates: the FigureWidget, the panels, the traces;
* ``serialize``: turning the map's widget state into the comm message the browser receives (ipywidgets'
  ``get_state`` + buffer extraction + JSON of the rest), and the message size split into binary buffers and JSON;
* ``click`` / ``color``: one ``explorer.click`` (neighbor query, card, overlay update) and one ``set_color`` switch;
* ``peak RSS`` of the process.

Baseline, in the same run and also one subprocess per size: a plain ``FigureWidget`` built the way a notebook
usually does it: float64 coordinates, int64 category codes (which plotly sends as a JSON list) and one hover string
per point. A third line gives the size a pure JSON-list encoding of the Explorer's own arrays would have.

With ``--browser`` it also starts JupyterLab on localhost and drives headless Chromium (Playwright, with
``--chromium`` pointing at the Debian binary) to time, per size and variant, the seconds from running the map cell
(data and plotly already loaded by a setup cell) until the WebGL map is drawn, and for the Explorer the seconds from
a click on a point until the post card shows it. Browser timings on a small shared machine are noisy: check the
load average, repeat, and compare variants from the same run only.

Usage::

    python benchmarks/bench_explorer_render.py                 # 10k, 100k, 1M
    python benchmarks/bench_explorer_render.py --sizes 10000 --json out.json
    python benchmarks/bench_explorer_render.py --browser          # plus JupyterLab + headless Chromium
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DIM = 16  # vector size of the synthetic posts: the index is not what is measured here


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _synthetic(n: int, seed: int = 0) -> tuple[Any, np.ndarray]:
    """Embeddings of ``n`` fake posts (no images: thumbnails show placeholders) and clustered 2-D coordinates."""
    import polars as pl

    from ccclip_widgets.embed import Embeddings
    from ccclip_widgets.posts import Posts

    rng = np.random.default_rng(seed)
    ids = pl.int_range(n, eager=True).cast(pl.String)
    table = pl.DataFrame(
        {
            "post_id": "p" + ids,
            "image": ids + ".jpg",
            "image_path": pl.Series([None] * n, dtype=pl.String),
            "image_bytes": pl.Series([None] * n, dtype=pl.Binary),
            "text": "synthetic caption number " + ids,
            "image_key": "k" + ids,
            "text_key": "t" + ids,
            "row": np.arange(n, dtype=np.int64),
            "lang": rng.choice(np.array(["en", "de", "uk", "es"]), n),
            "caption_kind": rng.choice(np.array(["descriptive", "commentative"]), n),
        }
    )
    centers = rng.normal(size=(40, DIM)).astype(np.float32)
    vec = centers[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, DIM)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    c2 = rng.normal(scale=8, size=(40, 2))
    coords = c2[rng.integers(0, 40, n)] + rng.normal(size=(n, 2))
    emb = Embeddings(Posts(table), vec, vec.copy(), "synthetic", "synthetic", pl.DataFrame())
    return emb, coords


def _message(widget: Any) -> dict[str, Any]:
    """Serialize a widget's state as its comm open message would: binary buffers plus JSON for the rest."""
    from ipywidgets.widgets.widget import _remove_buffers

    t0 = time.perf_counter()
    state = widget.get_state()
    state, _paths, buffers = _remove_buffers(state)
    text = json.dumps(state, separators=(",", ":"), default=str)
    dt = time.perf_counter() - t0
    nbytes = sum(memoryview(b).nbytes for b in buffers)
    esm = state.get("_esm", "")  # anywidget's JavaScript module (plotly.js), the same at every size
    return {
        "serialize_s": dt,
        "buffer_mb": nbytes / 1e6,
        "json_mb": len(text) / 1e6,
        "js_module_mb": len(esm if isinstance(esm, str) else "") / 1e6,
        "n_buffers": len(buffers),
    }


def run_explorer(n: int) -> dict[str, Any]:
    """Explorer measurements for one size (run in its own process)."""
    t0 = time.perf_counter()
    import plotly.graph_objects as go

    go.FigureWidget  # noqa: B018 - the slow first import
    import_s = time.perf_counter() - t0

    from ccclip_widgets.neighbors import NeighborIndex
    from ccclip_widgets.widgets import Explorer

    emb, coords = _synthetic(n)
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    index = NeighborIndex.build(emb.post_ids, emb.image, emb.text, exact_threshold=n + 1, show_progress=False)
    index_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ex = Explorer(emb, index=index, coords=coords, color="caption_kind", show_progress=False)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.widget  # noqa: B018
    widget_s = time.perf_counter() - t0
    fig = ex.figures[0]
    msg = _message(fig)
    main = next(t for t in fig.data if t.name == "posts")
    dtypes = {"x": str(main.x.dtype), "y": str(main.y.dtype), "color": str(main.marker.color.dtype)}

    t0 = time.perf_counter()
    ex.click(n // 2)
    click_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.set_color("lang")
    color_s = time.perf_counter() - t0
    # what the same arrays would weigh as JSON lists (the encoding plotly falls back to for lists and int64)
    t0 = time.perf_counter()
    as_lists = json.dumps({"x": main.x.tolist(), "y": main.y.tolist(), "color": main.marker.color.tolist()})
    lists_s = time.perf_counter() - t0
    return {
        "variant": "explorer",
        "n": n,
        "drawn": ex.n_drawn,
        "import_s": import_s,
        "index_s": index_s,
        "init_s": init_s,
        "widget_s": widget_s,
        "build_s": init_s + widget_s,
        **msg,
        "dtypes": dtypes,
        "click_s": click_s,
        "color_s": color_s,
        "json_lists_mb": len(as_lists) / 1e6,
        "json_lists_s": lists_s,
        "rss_data_mb": rss_data,
        "peak_rss_mb": _rss_mb(),
    }


def run_baseline(n: int) -> dict[str, Any]:
    """A plain FigureWidget as usually written: float64 x/y, int64 codes, one hover string per point."""
    t0 = time.perf_counter()
    import plotly.graph_objects as go

    go.FigureWidget  # noqa: B018
    import_s = time.perf_counter() - t0
    emb, coords = _synthetic(n)
    table = emb.posts.table
    rss_data = _rss_mb()
    t0 = time.perf_counter()
    codes = table["caption_kind"].cast(str).rank("dense").to_numpy().astype(np.int64) - 1
    fig = go.FigureWidget(
        data=[
            go.Scattergl(
                x=coords[:, 0].astype(np.float64),
                y=coords[:, 1].astype(np.float64),
                mode="markers",
                marker={"color": codes, "size": 3},
                hovertext=table["text"].to_list(),
                customdata=np.arange(n, dtype=np.int64),
            )
        ]
    )
    build_s = time.perf_counter() - t0
    msg = _message(fig)
    return {
        "variant": "baseline",
        "n": n,
        "drawn": n,
        "import_s": import_s,
        "build_s": build_s,
        **msg,
        "rss_data_mb": rss_data,
        "peak_rss_mb": _rss_mb(),
    }


# ---------------------------------------------------------------------------------------------- browser side
_SETUP_CELL = """import sys, time
sys.path.insert(0, {bench_dir!r})
from bench_explorer_render import _synthetic
from ccclip_widgets.neighbors import NeighborIndex
from ccclip_widgets.widgets import Explorer, _common
import plotly.graph_objects as go
go.FigureWidget  # imported here: the timed cell measures the map, not plotly's first import
emb, coords = _synthetic({n})
index = NeighborIndex.build(emb.post_ids, emb.image, emb.text, exact_threshold={n} + 1, show_progress=False)
"""

_CELLS = {
    "explorer": "ex = Explorer(emb, index=index, coords=coords, color='caption_kind', show_progress=False)\nex",
    "baseline": (
        "import numpy as np\n"
        "t = emb.posts.table\n"
        "codes = t['caption_kind'].cast(str).rank('dense').to_numpy().astype(np.int64) - 1\n"
        "fig = go.FigureWidget(data=[go.Scattergl(x=coords[:, 0], y=coords[:, 1], mode='markers', "
        "marker={{'color': codes, 'size': 3}}, hovertext=t['text'].to_list(), "
        "customdata=np.arange({n}, dtype=np.int64))])\n"
        "fig.add_class('ccclip-map')\nfig"
    ),
}

_DRAWN_JS = """() => { const gd = document.querySelector('.ccclip-map');
  if (!gd || !gd._fullData || !gd.calcdata || !gd.calcdata.length) return false;
  const cv = gd.querySelector('canvas.gl-canvas-context'); return !!cv && cv.width > 0; }"""

_POINT_JS = """(gd) => { const fl = gd._fullLayout; const d = gd.data.find(t => t.type === 'scattergl' && t.x.length > 100);
  const i = 17; const r = gd.getBoundingClientRect();
  return {x: r.left + fl.xaxis._offset + fl.xaxis.l2p(d.x[i]), y: r.top + fl.yaxis._offset + fl.yaxis.l2p(d.y[i])}; }"""


def run_browser(sizes: list[int], variants: tuple[str, ...], chromium: str) -> list[dict[str, Any]]:
    """Time from running the map cell to the drawn WebGL map in JupyterLab + headless Chromium.

    Each size and variant gets its own notebook and kernel: a setup cell (data, index, plotly imported, not
    timed), then the timed cell. For the Explorer, a click on a point is timed until the card shows it.
    """
    import signal
    import tempfile
    import urllib.request
    import uuid
    from pathlib import Path

    import nbformat
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="ccclip-bench-lab-"))
    bench_dir = str(Path(__file__).resolve().parent)
    for n in sizes:
        for v in variants:
            nb = nbformat.v4.new_notebook()
            nb.cells = [
                nbformat.v4.new_code_cell(_SETUP_CELL.format(bench_dir=bench_dir, n=n)),
                nbformat.v4.new_code_cell(_CELLS[v].format(n=n)),
            ]
            nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
            nbformat.write(nb, root / f"{v}_{n}.ipynb")
    port, token = 18000 + os.getpid() % 1000, uuid.uuid4().hex
    lab = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=flags)
            for n in sizes:
                for v in variants:
                    page = browser.new_page(viewport={"width": 1600, "height": 1000})
                    try:
                        row = _browser_case(page, port, token, n, v)
                    except Exception as exc:  # one failed case must not lose the others
                        shot = root / f"failed_{v}_{n}.png"
                        page.screenshot(path=str(shot))
                        row = {"variant": v, "n": n, "first_draw_s": float("nan"), "error": str(exc)[:300]}
                        print(f"browser {v} n={n}: failed ({str(exc)[:120]}); screenshot {shot}", flush=True)
                    rows.append(row)
                    print(f"browser {v:9s} n={n:>9,}: map drawn {row['first_draw_s']:.1f} s after running the cell, "
                          f"click -> card {row.get('click_s', float('nan')):.2f} s", flush=True)  # fmt: skip
                    page.close()
                    _shutdown_kernels(port, token)  # one kernel at a time: 1M-point kernels are large
            browser.close()
    finally:
        lab.send_signal(signal.SIGINT)
        try:
            lab.wait(15)
        except subprocess.TimeoutExpired:
            lab.kill()
    return rows


def _shutdown_kernels(port: int, token: str) -> None:
    """Stop every kernel of the benchmark's own JupyterLab server (through its REST API)."""
    import urllib.request

    base = f"http://127.0.0.1:{port}/api/kernels"
    headers = {"Authorization": f"token {token}"}
    with urllib.request.urlopen(urllib.request.Request(base, headers=headers), timeout=10) as resp:
        kernels = json.loads(resp.read())
    for k in kernels:
        req = urllib.request.Request(f"{base}/{k['id']}", headers=headers, method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


def _browser_case(page: Any, port: int, token: str, n: int, variant: str) -> dict[str, Any]:
    """Open one benchmark notebook, run its setup cell, then time its map cell (and a click)."""
    import uuid

    idle = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    ws = uuid.uuid4().hex[:8]
    page.goto(f"http://127.0.0.1:{port}/lab/workspaces/{ws}/tree/{variant}_{n}.ipynb?token={token}&reset")
    page.wait_for_selector(idle, timeout=180_000)
    time.sleep(1.5)
    dialog = page.locator(".jp-Dialog button:has-text('Select')")
    if dialog.count():
        dialog.click()
        page.wait_for_selector(idle, timeout=180_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    cells.nth(0).click()
    page.keyboard.press("Shift+Enter")
    page.wait_for_selector(
        ".jp-Notebook .jp-Cell >> nth=0 >> .jp-InputPrompt:has-text('[1]')", timeout=600_000
    )
    cells.nth(1).click()
    t0 = time.perf_counter()
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(_DRAWN_JS, timeout=300_000, polling=50)
    row: dict[str, Any] = {"variant": variant, "n": n, "first_draw_s": time.perf_counter() - t0}
    page.wait_for_selector(idle, timeout=300_000)
    row["cell_done_s"] = time.perf_counter() - t0
    if variant == "explorer":
        time.sleep(1.0)  # let the page settle: hover is ignored while plotly is still busy
        row["click_s"] = _browser_click(page)
    row["page_errors"] = errors[:3]
    return row


def _browser_click(page: Any) -> float:
    """Hover then click point 17 of the map; seconds from the click until the card shows that post."""
    plot = page.locator(".ccclip-map").first
    plot.scroll_into_view_if_needed()
    time.sleep(0.5)
    pos = plot.evaluate(_POINT_JS)
    for _ in range(3):  # plotly throttles hover: wiggle until its label shows (big maps may show no label)
        page.mouse.move(pos["x"] - 2, pos["y"] - 2)
        page.mouse.move(pos["x"], pos["y"])
        try:
            page.wait_for_selector(".hoverlayer .hovertext", timeout=5_000)
            break
        except Exception:
            continue
    time.sleep(0.5)
    t0 = time.perf_counter()
    page.mouse.click(pos["x"], pos["y"])
    try:
        page.wait_for_function(  # dense maps: plotly may pick a point drawn over point 17; any opened post counts
            "() => { const c = document.querySelector('.ccclip-card .ccclip-card-body');"
            " return !!c && !!c.dataset.postId; }",
            timeout=60_000,
        )
    except Exception:
        return float("nan")
    return time.perf_counter() - t0


def _child(n: int, variant: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", str(n), "--variant", variant]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| points | variant | first plotly import s | build s | serialize s | binary MB | JSON MB "
        "(plotly JS incl.) | click s | color s | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['variant']} | {r['import_s']:.2f} | {r['build_s']:.2f} | {r['serialize_s']:.2f} | "
            f"{r['buffer_mb']:.1f} | {r['json_mb']:.1f} | {r.get('click_s', float('nan')):.3f} | "
            f"{r.get('color_s', float('nan')):.3f} | {r['peak_rss_mb']:.0f} |"
        )
    for r in rows:
        if r["variant"] == "explorer":
            lines.append(
                f"\n{r['n']:,} points: the Explorer's arrays as JSON lists would be {r['json_lists_mb']:.1f} MB "
                f"(encoded in {r['json_lists_s']:.2f} s) instead of {r['buffer_mb']:.1f} MB of binary buffers; "
                f"dtypes sent {r['dtypes']}; plotly's JS module in the state: {r['js_module_mb']:.1f} MB."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-FigureWidget baseline")
    ap.add_argument(
        "--browser",
        action="store_true",
        help="also time the first drawn map in JupyterLab + headless Chromium (needs playwright, chromium)",
    )
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable for --browser")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="explorer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        fn = run_explorer if args.variant == "explorer" else run_baseline
        print(json.dumps(fn(args.one)))
        return 0
    rows = []
    for n in args.sizes:
        for variant in ("explorer",) + (() if args.no_baseline else ("baseline",)):
            r = _child(n, variant)
            rows.append(r)
            print(f"{variant:9s} n={n:>9,}: build {r['build_s']:.2f} s, serialize {r['serialize_s']:.2f} s, "
                  f"{r['buffer_mb']:.1f} MB binary + {r['json_mb']:.1f} MB JSON, peak RSS {r['peak_rss_mb']:.0f} MB",
                  flush=True)  # fmt: skip
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    import plotly

    print(f"\nMachine: {hw}; plotly {plotly.__version__}\n")
    print(_table(rows))
    browser_rows: list[dict[str, Any]] = []
    if args.browser:
        variants = ("explorer",) + (() if args.no_baseline else ("baseline",))
        browser_rows = run_browser(args.sizes, variants, args.chromium)
        print("\n| points | variant | cell run -> map drawn s | click -> card s |\n|---|---|---|---|")
        for r in browser_rows:
            print(
                f"| {r['n']:,} | {r['variant']} | {r['first_draw_s']:.1f} | {r.get('click_s', float('nan')):.2f} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            out = {"machine": hw, "plotly": plotly.__version__, "rows": rows, "browser": browser_rows}
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
