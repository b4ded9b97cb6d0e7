#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (slow multi-process tests included).
# Where permitted (root), the suite runs in a fresh network namespace with only loopback, so no
# test can reach any other address; elsewhere it runs on plain loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# Lint and format first: a style error fails the run as a test would (ruff is pinned in pyproject.toml).
.venv/bin/ruff check --quiet . || { echo "test: ruff check failed (fix, or .venv/bin/ruff check --fix .)" >&2; exit 1; }
.venv/bin/ruff format --check --quiet . || { echo "test: files need formatting (.venv/bin/ruff format .)" >&2; exit 1; }
# The health page is tested in a real headless Chromium, the relay's storage in a real PostgreSQL, the KV tier in a real Redis
# (Debian's packages; the PostgreSQL test is skipped only where they cannot be installed), NAT in
# network namespaces with iptables.
missing=""
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  missing="chromium chromium-driver"
fi
if ! command -v pg_ctl >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  missing="$missing postgresql"
fi
# The NAT tests build network namespaces behind an iptables masquerade (root only; skipped elsewhere).
if [ "$(id -u)" = 0 ] && ! command -v iptables >/dev/null; then
  missing="$missing iptables"
fi
# The KV tier's tests start a real redis-server on loopback (skipped, with the reason, without it).
if ! command -v redis-server >/dev/null; then
  missing="$missing redis-server"
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing$missing (Debian packages)" >&2
    # shellcheck disable=SC2086
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; } \
      >/dev/null 2>&1 || echo "test: could not install$missing" >&2
  else
    echo "test: missing Debian packages:$missing (sudo apt-get install$missing)" >&2
  fi
fi
mkdir -p artifacts
# Two workers (SWARM_TEST_WORKERS), one test file each at a time: most multi-process tests spend
# their time waiting on sockets and timers, so two files overlap well even on two cores. Short
# tracebacks: CI keeps only the start of the output, and it should hold every failure.
set -- -n "${SWARM_TEST_WORKERS:-2}" --dist loadfile --tb=short "$@"
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null && command -v ip >/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
