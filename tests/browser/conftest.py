"""Fixtures for the real-browser tests: a JupyterLab server on localhost and headless Debian Chromium.

The server runs from the repository root with a fixed token, ``CCCLIP_SMOKE=1`` (the notebooks' small subsets) and
a temporary cache folder. Chromium is Debian's ``/usr/bin/chromium`` (``apt-get install -y chromium``); Playwright's
own browser downloads do not work here, so a missing Chromium fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CCCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
TOKEN = "ccclip-browser-test-token"

#: Console messages that say nothing about the widgets (resource noise of a server without internet).
HARMLESS = (
    "favicon",
    "404",
    "Failed to load resource",
    "net::ERR_",
    "[Violation]",
    "ResizeObserver loop",
)
#: Console / page messages that mean a widget failed to show.
WIDGET_ERRORS = (
    "Error displaying widget",
    "Failed to load model class",
    "Could not create a model",
    "Could not create view",
    "Model not found",
    "Error setting state",
    "Failed to create view",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab server."""

    url: str
    token: str
    log: Path

    def notebook_url(self, notebook: str) -> str:
        """URL that opens ``notebook`` (relative to the repository root, e.g. ``notebooks/01_explore.ipynb``) in a fresh workspace of its own."""
        return f"{self.url}/lab/workspaces/t{uuid.uuid4().hex[:10]}/tree/{notebook}?token={self.token}&reset"


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Start JupyterLab on a copy of the repository's notebooks, wait until it answers, and stop it (only its own process)."""
    tmp = tmp_path_factory.mktemp("lab")
    yield from _run_lab(tmp, smoke=True, cache=tmp / "cache")


#: Cache of the full-demo server: embeddings and maps of the 8,000 demo posts survive between runs (the first run
#: embeds them, several minutes on 2 cores). Set ``CCCLIP_BROWSER_CACHE`` to move it.
FULL_CACHE = Path(os.environ.get("CCCLIP_BROWSER_CACHE", Path.home() / ".cache" / "ccclip_widgets-browser"))


@pytest.fixture(scope="session")
def lab_full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab running the notebooks on the full demo (no smoke subset), with a cache kept between runs."""
    tmp = tmp_path_factory.mktemp("lab-full")
    yield from _run_lab(tmp, smoke=False, cache=FULL_CACHE)


def _run_lab(tmp: Path, *, smoke: bool, cache: Path) -> Iterator[Lab]:
    port = _free_port()
    env = dict(os.environ)
    env.pop("CCCLIP_SMOKE", None)
    if smoke:
        env["CCCLIP_SMOKE"] = "1"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CCCLIP_CACHE=str(cache),
        CCCLIP_WORK_DIR=str(tmp / "work"),
        JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
    )
    # The server serves a copy of the notebooks: JupyterLab saves the notebooks it opens (outputs, metadata),
    # and the committed ones must stay as they are.
    root = tmp / "root"
    shutil.copytree(
        REPO / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints")
    )
    log = tmp / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        "--ServerApp.disable_check_xsrf=True",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer on {url} in 180 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield Lab(url=url, token=TOKEN, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (never Playwright's own downloaded browsers)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's package (`apt-get install -y chromium`); "
            "the browser tests must run, not skip. (Do not use `playwright install`.)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - environment problem
        pytest.fail(f"playwright is not installed ({exc}); `pip install -e .[dev]` installs it")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Console:
    """Browser console errors and uncaught page errors seen by one page."""

    errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def relevant(self) -> list[str]:
        """Console errors other than the known harmless resource noise."""
        return [e for e in self.errors if not any(h in e for h in HARMLESS)]

    def widget_errors(self) -> list[str]:
        """Messages that say a widget failed to load or display."""
        return [e for e in self.errors + self.page_errors if any(w in e for w in WIDGET_ERRORS)]


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser page (1500 x 1000) with its console errors collected on ``page.console``."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    console = Console()
    pg.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: console.page_errors.append(str(e)))
    pg.console = console
    try:
        yield pg
    finally:
        try:
            pg.screenshot(path=str(tmp_path / "final-page.png"))
        except Exception:  # a screenshot of a broken page is best effort
            pass
        context.close()
