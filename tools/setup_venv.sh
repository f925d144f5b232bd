#!/usr/bin/env bash
# Create or refresh .venv at the repo root with edgefleet and every extra (cloud, test).
# Re-running is cheap: pip is only invoked when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  # tflite-runtime has wheels up to Python 3.11; prefer it, fall back to any python3 (ai-edge-litert).
  for cand in python3.11 python3.10 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.edgefleet-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/edge-agent ]; then
  echo "setup: installing edgefleet[cloud,test] into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[cloud,test]'
  echo "$want" > "$stamp"
fi
