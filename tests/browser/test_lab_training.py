"""Real-browser tests of the Gap view and the FineTune panel (JupyterLab in headless Debian Chromium).

* The Gap chart of notebook 03 draws bars per caption kind and language, with a legend and the chance level.
* Start in the FineTune panel of notebook 02 runs a short fine-tune to "finished" with a moving progress bar.
* Interrupting a cell that waits for fine-tuning (Kernel > Interrupt) stops the run: the panel reaches "stopped",
  ``ft.result`` is set and the next cells run.
* The Gap view on the full demo (every test image, captions in four languages, before and after fine-tuning
  the projections), screenshot at 1600 x 1000 for the README (``docs/img/gap.png``).

Run with ``pytest tests/browser/test_lab_training.py``; a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from test_lab import DOCS_IMG, KERNEL_TIMEOUT_MS, _check_console, _open_notebook, _run_all, _shot

pytestmark = pytest.mark.browser


def _legend(page: Any, selector: str) -> str:
    return " | ".join(page.locator(f"{selector} .legendtext").all_text_contents())


def _add_cell_and_run_below(page: Any, code: str) -> None:
    """Append a code cell with ``code`` at the end of the notebook and run it and every cell below it."""
    last = page.locator(".jp-Notebook .jp-Cell").last
    last.scroll_into_view_if_needed()
    last.click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.insert_text(code)  # no auto-closed brackets
    page.keyboard.press("Escape")


def test_gap_chart_shows_kinds_languages_chance_and_legend(page: Any, lab: Any, tmp_path: Path) -> None:
    nb = "notebooks/03_the_gap.ipynb"
    _open_notebook(page, lab, nb)
    _run_all(page, nb)

    page.wait_for_selector(".ccclip-gap-chart .main-svg", state="attached", timeout=KERNEL_TIMEOUT_MS)
    page.locator(".ccclip-gap-chart").first.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => document.querySelectorAll('.ccclip-gap-chart .legendtext').length >= 2", timeout=60_000
    )
    legend = _legend(page, ".ccclip-gap-chart")
    assert "stock model" in legend and "chance" in legend, f"legend: {legend!r}"
    ticks = " | ".join(
        page.locator(".ccclip-gap-chart .xtick text, .ccclip-gap-chart .xtick2 text").all_text_contents()
    )
    assert "descriptive" in ticks and "commentative" in ticks, f"x axis: {ticks!r}"
    buttons = page.locator(".ccclip-gap .widget-toggle-button").all_inner_texts()
    assert "R@10" in buttons, f"metric buttons cut: {buttons}"
    _shot(page, ".ccclip-gap", tmp_path / "gap-smoke.png")
    _check_console(page, nb)


_WATCH_FT_JS = """() => {
  window.__ftSeen = [];
  const note = () => {
    const s = document.querySelector('.ccclip-ft-status [data-status]');
    const label = document.querySelector('.ccclip-ft-progress-label');
    const bar = document.querySelector('.ccclip-ft-progress .progress-bar');
    window.__ftSeen.push({status: s ? s.dataset.status : null, label: label ? label.textContent : null,
                          width: bar ? bar.style.width : null});
  };
  note();
  new MutationObserver(note).observe(document.querySelector('.ccclip-ft'),
    {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def test_finetune_start_runs_to_finished(page: Any, lab: Any, tmp_path: Path) -> None:
    nb = "notebooks/02_finetune.ipynb"
    _open_notebook(page, lab, nb)
    _run_all(page, nb)  # the notebook itself trains once (2 steps in smoke mode) and waits for it

    status = page.locator(".ccclip-ft-status [data-status]").first
    assert status.get_attribute("data-status") == "finished"
    start = page.locator(".ccclip-ft-start").first
    start.scroll_into_view_if_needed()
    page.evaluate(_WATCH_FT_JS)
    start.click()  # a second run, from a fresh copy of the base model

    page.wait_for_function(
        "() => window.__ftSeen.some(s => s.status === 'running')"
        " && document.querySelector('.ccclip-ft-status [data-status]').dataset.status === 'finished'",
        timeout=KERNEL_TIMEOUT_MS,
    )
    seen = page.evaluate("() => window.__ftSeen")
    assert "failed" not in [s["status"] for s in seen], seen
    widths = [float(s["width"].rstrip("%")) for s in seen if s["width"]]
    assert widths and min(widths) < 100.0, f"the progress bar never restarted: {seen}"
    label = page.locator(".ccclip-ft-progress-label").first.inner_text()
    done, _, total = label.split()[0].partition("/")
    assert int(done) > 0 and int(total) > 0, f"progress label {label!r}"
    legend = _legend(page, ".ccclip-ft-metrics")
    assert "R@5" in legend and "chance" in legend, f"recall chart legend: {legend!r}"
    try:  # let the loss curve draw its points before the picture (not asserted: plotly redraws lazily)
        page.wait_for_function(
            "() => { let g = document.querySelector('.ccclip-ft-loss');"
            " if (g && !g._fullLayout) g = g.querySelector('.js-plotly-plot');"
            " return !!g && !!g.data && g.data.length > 0 && g.data[0].x && g.data[0].x.length > 0; }",
            timeout=20_000,
        )
    except PlaywrightTimeout:
        warnings.warn("the FineTune loss curve showed no points after a finished run", stacklevel=1)
    _shot(page, ".ccclip-ft", tmp_path / "finetune.png", DOCS_IMG / "finetune.png")
    _check_console(page, nb)


_LONG_RUN = """ft.configure(max_steps=100000)
ft.start()
await ft.wait_async()
print("after the wait:", ft.status, ft.result.stopped, ft.result.steps)"""
_NEXT_CELL = 'print("the notebook went on")'


def test_interrupting_a_finetune_cell_stops_it_and_the_notebook_goes_on(
    page: Any, lab: Any, tmp_path: Path
) -> None:
    nb = "notebooks/03_the_gap.ipynb"
    _open_notebook(page, lab, nb)
    _run_all(page, nb)
    _add_cell_and_run_below(page, _LONG_RUN)
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    page.keyboard.insert_text(_NEXT_CELL)
    page.keyboard.press("Escape")
    page.keyboard.press("k")  # back to the training cell, then run it and the one below
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run Selected Cell and All Below").first.click()
    page.wait_for_function(
        "() => { const s = document.querySelector('.ccclip-ft-status [data-status]');"
        " const l = document.querySelector('.ccclip-ft-progress-label');"
        " return s && s.dataset.status === 'running' && l && parseInt(l.textContent) >= 3; }",
        timeout=KERNEL_TIMEOUT_MS,
    )
    page.locator(".lm-MenuBar-itemLabel", has_text="Kernel").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Interrupt Kernel").first.click()
    page.wait_for_function(
        "() => document.querySelector('.ccclip-ft-status [data-status]').dataset.status === 'stopped'",
        timeout=KERNEL_TIMEOUT_MS,
    )
    outputs = "() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea')].map(o => o.innerText).join('\\n')"
    page.wait_for_function(f"() => ({outputs})().includes('the notebook went on')", timeout=KERNEL_TIMEOUT_MS)
    text = page.evaluate(outputs)
    assert "after the wait: stopped user" in text, text[-2000:]
    assert "Traceback" not in text and "AttributeError" not in text and "CancelledError" not in text
    page.locator(".ccclip-ft").first.scroll_into_view_if_needed()
    page.screenshot(path=str(tmp_path / "interrupted.png"))
    _check_console(page, nb)


_FULL_DEMO = [
    "import warnings\n\nimport polars as pl\n\nfrom ccclip_widgets import embed_posts, fine_tune, load_model, FineTuneConfig\n"
    "from ccclip_widgets.demo import load_demo_posts\nfrom ccclip_widgets.widgets import Gap\n\n"
    "posts = load_demo_posts()\nmodel = load_model('demo')\n"
    "test = posts.filter(pl.col('split') == 'test')\n"
    "train = posts.filter((pl.col('split') == 'train') & (pl.col('caption_kind') == 'commentative'))\n"
    "keep = train.table['image_key'].unique(maintain_order=True).head(400).to_list()  # minutes on 2 CPU cores\n"
    "train = train.filter(pl.col('image_key').is_in(keep))\n"
    "before = embed_posts(test, model, show_progress=False)",
    "import copy, dataclasses\n\ntuned = dataclasses.replace(model, model=copy.deepcopy(model.model))\n"
    "cfg = FineTuneConfig(epochs=10, batch_size=128, lr=1e-3, train_projections_only=True, augment=False,\n"
    "                     show_progress=False, num_workers=0, checkpoint_every_steps=0)\n"
    "fine_tune(tuned, train, cfg)\nafter = embed_posts(test, tuned, show_progress=False)",
    "gap = Gap({'stock model': before, 'fine-tuned': after}, clip_models={'stock model': model, 'fine-tuned': tuned},\n"
    "          k=10, n_boot=500)\ngap",
]


def test_gap_on_the_full_demo_screenshot(page: Any, lab: Any, tmp_path: Path) -> None:
    """The README picture: all 403 test images, captions in en/uk/es/de, before and after fine-tuning the projections."""
    root = lab.log.parent / "root"  # the server's copy of the notebooks (see conftest.lab)
    nb = "notebooks/gap_full_demo.ipynb"
    cells = [
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in _FULL_DEMO
    ]
    doc = {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": "The gap on the full demo"}, *cells],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (root / nb).write_text(json.dumps(doc))
    page.set_viewport_size({"width": 1600, "height": 1000})
    _open_notebook(page, lab, nb)
    _run_all(page, nb)
    page.wait_for_function(
        "() => document.querySelectorAll('.ccclip-gap-chart .legendtext').length >= 3",
        timeout=KERNEL_TIMEOUT_MS,
    )
    ticks = " ".join(page.locator(".ccclip-gap-chart .xtick text").all_text_contents())
    for lang in ("en", "uk", "es", "de"):
        assert lang in ticks, f"language {lang} missing from the chart: {ticks!r}"
    time.sleep(1.0)
    _shot(page, ".ccclip-gap", tmp_path / "gap.png", DOCS_IMG / "gap.png")
    _check_console(page, nb)
