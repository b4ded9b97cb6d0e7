#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (slow multi-process tests included).
# Where permitted (root), the suite runs in a fresh network namespace with only loopback, so no
# test can reach any other address; elsewhere it runs on plain loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# The health page is tested in a real headless Chromium (Debian's packages).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing chromium and chromium-driver (Debian packages)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 ||
      echo "test: could not install chromium; the health-page test will fail" >&2
  else
    echo "test: chromium and chromedriver are missing (sudo apt-get install chromium chromium-driver)" >&2
  fi
fi
mkdir -p artifacts
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
