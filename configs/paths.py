"""Where Swarm keeps files between runs (converted models, throughput measurements)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SWARM_CACHE_DIR`, else `$XDG_CACHE_HOME/swarm`, else `~/.cache/swarm`."""
    root = os.environ.get("SWARM_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "swarm")
    return Path(root).expanduser()


def worker_config() -> Path:
    """`$SWARM_WORKER_CONFIG`, else `$XDG_CONFIG_HOME/swarm/worker.yaml`, else `~/.config/swarm/worker.yaml`:
    the file `python -m swarm.worker` configures and starts from."""
    explicit = os.environ.get("SWARM_WORKER_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config"), "swarm", "worker.yaml").expanduser()
