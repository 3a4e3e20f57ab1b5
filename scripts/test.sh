#!/usr/bin/env bash
# Set up the environment, lint, then run a test lane:
#   bash scripts/test.sh            the default lane: everything not marked slow or browser, in parallel (xdist)
#   bash scripts/test.sh slow       tests marked slow (subprocess kill chains, notebooks, the demo, the wheel)
#   bash scripts/test.sh browser    real-browser tests (JupyterLab in Debian's Chromium, Playwright)
#   bash scripts/test.sh all        every lane, one after the other (what CI runs)
# Further arguments go to pytest (e.g. bash scripts/test.sh fast -k fetch). CCCLIP_TEST_WORKERS sets the
# parallel workers of the default lane (default 2; "auto" uses every core). CCCLIP_SKIP_SETUP=1 skips setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
lane=fast
case "${1:-}" in fast | slow | browser | all) lane=$1; shift ;; esac

# The browser tests drive Debian's Chromium. Check for it first, so a fresh machine learns in seconds (not
# after minutes of tests) what is missing: install it when we can (root with apt), else say the one command.
chromium="${CCCLIP_CHROMIUM:-/usr/bin/chromium}"
if [ "$lane" = browser ] || [ "$lane" = all ]; then
  if [ ! -x "$chromium" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "test.sh: $chromium is missing; installing Debian's chromium with apt-get" >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "test.sh: the browser tests need Chromium at $chromium. Install it with:" >&2
      echo "    sudo apt-get install -y chromium" >&2
      echo "(or run the other lanes: bash scripts/test.sh fast; bash scripts/test.sh slow)" >&2
      exit 1
    fi
  fi
fi

if [ "${CCCLIP_SKIP_SETUP:-0}" != 1 ]; then
  bash scripts/setup.sh
fi
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# numba's compiled kernels (umap-learn, pynndescent) are kept between runs here (tests/conftest.py sets the same)
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.pytest_cache/numba}"
ruff check ccclip_widgets tests benchmarks tools
ruff format --check ccclip_widgets tests benchmarks tools

pytest_args=(-q -p no:cacheprovider --timeout 900)
run_lane() {
  local name=$1
  shift
  local start=$SECONDS rc=0
  echo "test.sh: lane '$name'" >&2
  python -m pytest "${pytest_args[@]}" "$@" || rc=$?
  echo "test.sh: lane '$name' took $((SECONDS - start)) s (exit status $rc)" >&2
  return "$rc"
}
fast() { run_lane fast -n "${CCCLIP_TEST_WORKERS:-2}" -m "not slow and not browser" "$@"; }
slow() { run_lane slow -n "${CCCLIP_TEST_WORKERS:-2}" -m "slow and not browser" "$@"; }
browser() { run_lane browser -m browser "$@"; }
case "$lane" in
  fast) fast "$@" ;;
  slow) slow "$@" ;;
  browser) browser "$@" ;;
  all)  # every lane runs; the script fails if any lane failed
    status=0
    fast "$@" || status=$?
    slow "$@" || status=$?
    browser "$@" || status=$?
    exit "$status"
    ;;
esac
