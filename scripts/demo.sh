#!/usr/bin/env bash
# Installs everything, then runs a local swarm on 127.0.0.1 that answers a prompt with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m demo "$@"
