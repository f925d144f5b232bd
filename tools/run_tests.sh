#!/usr/bin/env bash
# The README's test command runs this (via `make test`): venv is already fresh.
# Installs mosquitto when missing (the OTA tests start their own brokers), then runs pytest.
# pytest's exit code 5 ("no tests ran") is turned into a failure so CI never passes vacuously.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "test: installing mosquitto"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mosquitto >/dev/null
fi
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests — failing on purpose" >&2
  exit 1
fi
exit "$rc"
