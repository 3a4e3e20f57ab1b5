"""The tutorial notebooks: committed without outputs, and each executes top to bottom in smoke mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_tutorial_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_explore.ipynb", "02_finetune.ipynb", "03_the_gap.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name} has committed outputs; clear them before committing"
            assert cell.execution_count is None
    assert any(c.cell_type == "markdown" for c in nb.cells), "a tutorial explains itself"
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f"{path.name} needs a cell tagged 'parameters'"


@pytest.mark.slow  # 38-58 s per notebook (kernel start, smoke run)
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executes_in_smoke_mode(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CCCLIP_SMOKE", "1")
    monkeypatch.setenv("CCCLIP_WORK_DIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env={**os.environ})
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.get("output_type") == "error"
    ]
    assert not errors
    # the widgets were really built: at least one widget view in the outputs
    views = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "application/vnd.jupyter.widget-view+json" in out.get("data", {})
    ]
    assert views, f"{path.name} displayed no widget"
