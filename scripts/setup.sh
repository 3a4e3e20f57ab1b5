#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install ccclip_widgets with its
# development extras. Works offline against a PyPI mirror; torch and torchvision are pinned because
# open_clip needs torchvision and the CPU-only torch 2.13 build cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev]"
python - <<'PY'
import torch, torchvision, open_clip
print(f"environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}")
PY
