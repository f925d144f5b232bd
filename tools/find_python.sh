#!/usr/bin/env bash
# Print the path of a working Python for a name or version (python3.12, 3.12, /usr/bin/python3.12), or
# exit 1 printing nothing. Looks on PATH first, then in pyenv's versions (pyenv's shim for a version
# that is not pyenv's global one exists on PATH but fails), then /usr/bin and /usr/local/bin.
# "Working" means it runs and can create a venv (Debian's python3.X without python3.X-venv cannot).
set -uo pipefail
want=${1:?usage: find_python.sh python3.X|3.X|PATH}
case "$want" in
  */*) cands=("$want") ;;
  *)
    v=${want#python}
    name=python$v
    cands=("$name")
    if [[ $v =~ ^3\.[0-9]+$ ]]; then
      cands+=("${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"$name" "/usr/bin/$name" "/usr/local/bin/$name")
    fi
    ;;
esac
for c in "${cands[@]}"; do
  p=$(command -v "$c" 2>/dev/null) || continue
  if "$p" -c 'import ensurepip, sys, venv' >/dev/null 2>&1; then
    echo "$p"
    exit 0
  fi
done
exit 1
