"""A plain `pip install .` (a wheel, not an editable install) carries the demo data and weights: built here,
installed into a fresh virtual environment, and run as `ccclip demo --smoke` from outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of what the wheel needs (pip builds in-tree: keep the checkout clean)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ccclip_widgets", "data"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path / "wheel"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(src),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (wheel,) = out.glob("ccclip_widgets-*.whl")
    return wheel


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_smoke(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "ccclip_widgets/data/demo/posts.parquet" in names
    assert "ccclip_widgets/data/models/demo-clip/open_clip_model.safetensors" in names
    assert not [n for n in names if n.startswith("tools/") or "build_demo_data" in n]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # The dependencies (torch, open_clip, ...) come from this environment's site-packages, appended after the
    # fresh venv's own; a plain path line does not run this environment's editable-install hook.
    (purelib / "_ccclip_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=600)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CCCLIP_DATA_DIR", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CCCLIP_CACHE=str(tmp_path / "cache"))
    where = subprocess.check_output(
        [
            python,
            "-c",
            "import ccclip_widgets, ccclip_widgets._io as io; print(ccclip_widgets.__file__); print(io.repo_data_dir())",
        ],
        env=env,
        cwd=tmp_path,
        text=True,
    ).split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where
    run = subprocess.run(
        [
            venv / "bin" / "ccclip",
            "demo",
            "--no-lab",
            "--smoke",
            "--no-progress",
            "--out",
            str(tmp_path / "demo"),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Before fine-tuning" in run.stdout and "After fine-tuning" in run.stdout
    build = subprocess.run(
        [venv / "bin" / "ccclip", "demo", "build-data"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode != 0 and "source checkout" in build.stderr, build.stderr[-2000:]
