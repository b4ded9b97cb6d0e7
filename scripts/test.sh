#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (slow multi-process tests included).
# Where permitted (root), the suite runs in a fresh network namespace with only loopback, so no
# test can reach any other address; elsewhere it runs on plain loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
mkdir -p artifacts
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
