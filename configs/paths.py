"""Where Swarm keeps files between runs (converted models, throughput measurements)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SWARM_CACHE_DIR`, else `$XDG_CACHE_HOME/swarm`, else `~/.cache/swarm`."""
    root = os.environ.get("SWARM_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "swarm")
    return Path(root).expanduser()
