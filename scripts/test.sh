#!/usr/bin/env bash
# Set up and run every test: Python (unit, plugin over both loaders, real tensorboard
# process), frontend unit tests, the committed-bundle check, the browser tests in
# headless Debian chromium, then the demo for three training seeds, its check of the
# papers' discoveries, the README's table against the check's output, and the check
# against tampered demo logs.
#
# Needs: an activated virtual environment after `pip install -e ".[test]"` (the
# README's second command does both), Node.js >= 18 with npm, and Debian's chromium
# (installed here with apt-get when missing: needs root or sudo).
#
#   TB_CONCEPTEVO_SEEDS=1 bash scripts/test.sh   # demo for one seed only (faster; skips the README comparison)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

python -c "import tb_conceptevo, torch, tensorboard" || {
  echo "tb_conceptevo is not installed here; run: pip install -e '.[test]'" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || {
  echo "npm not found: the frontend and browser tests need Node.js >= 18 with npm (Debian: apt-get install nodejs npm)" >&2; exit 1; }

# Browser for the browser tests: Debian's chromium, never a downloaded one.
if ! command -v chromium >/dev/null 2>&1; then
  step "installing Debian's chromium for the browser tests (apt-get install chromium)"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "chromium is missing and this is not root and there is no sudo: install Debian's chromium first" >&2; exit 1; fi
  $sudo apt-get install -y -q chromium || { $sudo apt-get update -q && $sudo apt-get install -y -q chromium; }
fi

step "frontend: npm ci, committed bundle up to date, unit tests"
(cd frontend && npm ci --no-audit --no-fund --loglevel=error && npm run check-bundle && npm test)

step "Python tests: unit, plugin through TensorBoard's WSGI app (both loaders), a real tensorboard process, distributed"
python -m pytest -q tests "$@"

step "browser tests: a real tensorboard process serving writer-made logs, headless chromium"
(cd frontend && PYTHON="$(command -v python)" npm run test:browser)

# The demo end to end (four small runs per seed, ~3 minutes a seed on 2 cores) and its
# check of the papers' discoveries from the logged events.
seeds="${TB_CONCEPTEVO_SEEDS:-3}"
demo_logs="$(mktemp -d)"
trap 'rm -rf "$demo_logs"' EXIT
step "demo: training seeds 0-$((seeds - 1)), then its check"
python demo/run.py --no-serve --seeds "$seeds" --logdir "$demo_logs"
python demo/run.py --check --seeds "$seeds" --logdir "$demo_logs"
if [ "$seeds" = 3 ]; then
  step "README: its tables are what the check prints on these logs"
  python demo/run.py --check --seeds 3 --markdown --logdir "$demo_logs" > "$demo_logs/tables.md" || true
  python scripts/readme_tables.py --compare "$demo_logs/tables.md"
fi
step "the check fails on tampered demo logs"
TB_CONCEPTEVO_DEMO_LOGS="$demo_logs/seed0" python -m pytest -q tests/test_demo_check.py
