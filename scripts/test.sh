#!/usr/bin/env bash
# Set up and run every test: Python (unit, plugin over both loaders, real tensorboard
# process), frontend unit tests, the committed-bundle check and the browser tests in
# headless Debian chromium.  Run from an activated virtual environment after
# `pip install -e ".[test]"` (the README's second command does both).
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import tb_conceptevo, torch, tensorboard" || {
  echo "tb_conceptevo is not installed here; run: pip install -e '.[test]'" >&2; exit 1; }

# Browser for the browser tests: Debian's chromium, never a downloaded one.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; })
  else
    sudo apt-get install -y -q chromium >/dev/null
  fi
fi

# Frontend: dependencies from the lock file, unit tests, committed bundle up to date.
(cd frontend && npm ci --no-audit --no-fund --loglevel=error && npm run check-bundle && npm test)

# Python tests: unit, plugin through TensorBoard's WSGI app (both loaders), a real
# tensorboard process, distributed recording.
python -m pytest -q tests "$@"

# Browser tests: a real tensorboard process serving writer-made logs, headless chromium.
(cd frontend && PYTHON="$(command -v python)" npm run test:browser)

# The demo end to end (trains three small runs, ~3 minutes on 2 cores) and its check of
# the papers' discoveries from the logged events.
demo_logs="$(mktemp -d)"
python demo/run.py --no-serve --logdir "$demo_logs/runs"
python demo/run.py --check --logdir "$demo_logs/runs"
rm -rf "$demo_logs"
