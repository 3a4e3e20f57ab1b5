#!/usr/bin/env bash
# Set up the environment, then lint and run the whole test suite (unit, widget state, notebooks, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check ccclip_widgets tests benchmarks
ruff format --check ccclip_widgets tests benchmarks
python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
