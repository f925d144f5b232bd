#!/usr/bin/env bash
# Create or refresh the venv (default .venv at the repo root) with edgefleet and every extra (cloud, batch, litert, test).
# Re-running is cheap: pip is only invoked when pyproject.toml or the interpreter changed since the last install.
#   PYTHON=python3.13 make test      # pick the interpreter (3.10-3.13); an existing venv on another Python is rebuilt
#   VENV=.venv-3.13 PYTHON=...       # a separate venv (CI's matrix keeps one per Python)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ -n "${PYTHON:-}" ]; then
  PY=$(bash tools/find_python.sh "$PYTHON") || {
    echo "setup: PYTHON=$PYTHON is not a working Python with venv (looked on PATH, in pyenv, in /usr/bin)" >&2
    exit 1
  }
else
  # tflite-runtime has wheels up to Python 3.11; prefer it, then the newer Pythons (ai-edge-litert).
  for cand in 3.11 3.10 3.12 3.13 python3; do
    PY=$(bash tools/find_python.sh "$cand") && break
  done
  if [ -z "$PY" ]; then
    echo "setup: no Python 3.10-3.13 found (set PYTHON=python3.X)" >&2
    exit 1
  fi
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$pyver" in
  3.10|3.11) runtime="tflite-runtime 2.14 (numpy 1; ai-edge-litert beside it)" ;;
  3.12|3.13) runtime="ai-edge-litert (numpy 2)" ;;
  *) echo "setup: $PY is Python $pyver; edgefleet supports 3.10-3.13 (set PYTHON=python3.X)" >&2; exit 1 ;;
esac
if [ -x "$VENV/bin/python" ]; then
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo broken)
  if [ "$have" != "$pyver" ]; then
    echo "setup: $VENV is Python $have, $PY is $pyver: recreating it"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.edgefleet-installed
want=$( (cat pyproject.toml; echo "$pyver") | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$VENV/bin/edge-agent" ]; then
  echo "setup: installing edgefleet[cloud,batch,litert,test] into $VENV (Python $pyver, TFLite runtime: $runtime)"
  # uv (~30 s for this set where pip takes ~100 s), with pip's package sources (tools/uv_index_args.py);
  # pip itself when uv cannot be installed or fails.
  # COMPILE_BYTECODE=0 skips precompiling every installed module (~45 s of a fresh venv here): for a venv
  # whose users cache bytecode as they import (tools/run_tests.sh, CI's extra legs).
  compile=(--compile-bytecode)
  [ "${COMPILE_BYTECODE:-1}" = "0" ] && compile=()
  if "$VENV/bin/python" -m pip install -q uv 2>/dev/null && mapfile -t uvargs < <("$VENV/bin/python" tools/uv_index_args.py) \
    && "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" "${compile[@]}" "${uvargs[@]}" -e '.[cloud,batch,litert,test]'; then
    :
  else
    echo "setup: uv did not install the set; installing with pip"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[cloud,batch,litert,test]'
  fi
  echo "$want" > "$stamp"
fi
