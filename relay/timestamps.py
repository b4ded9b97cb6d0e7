"""Times in the relay's answers: ISO 8601 in UTC to the second, with a `Z` (as GPUStack writes them)."""

from __future__ import annotations

import datetime as dt
from typing import Optional


def iso(timestamp: Optional[float]) -> Optional[str]:
    """`2026-12-02T18:39:00Z` for unix seconds; None stays None (a time not known yet)."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
