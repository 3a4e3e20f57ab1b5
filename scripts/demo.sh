#!/usr/bin/env bash
# Set up the environment, run the offline demo (embed the demo posts, print the descriptive/commentative gap,
# fine-tune a demo C-CLIP, print the gap again) and open JupyterLab on the Explorer notebook.
# Extra arguments go to `ccclip demo` (e.g. --no-lab, --device cuda, --epochs 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec ccclip demo "$@"
