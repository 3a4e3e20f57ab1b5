#!/usr/bin/env bash
# Set up the environment, then lint and run the whole test suite (unit, widget state, notebooks, browser).
# Extra arguments go to pytest; with -m "not browser" no Chromium is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive Debian's Chromium. Check for it first, so a fresh machine learns in seconds (not
# after minutes of tests) what is missing: install it when we can (root with apt), else say the one command.
chromium="${CCCLIP_CHROMIUM:-/usr/bin/chromium}"
case " $* " in *"not browser"*) need_chromium=0 ;; *) need_chromium=1 ;; esac
if [ "$need_chromium" = 1 ] && [ ! -x "$chromium" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: $chromium is missing; installing Debian's chromium with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test.sh: the browser tests need Chromium at $chromium. Install it with:" >&2
    echo "    sudo apt-get install -y chromium" >&2
    echo "(or skip them: bash scripts/test.sh -m 'not browser')" >&2
    exit 1
  fi
fi

bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check ccclip_widgets tests benchmarks
ruff format --check ccclip_widgets tests benchmarks
python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
