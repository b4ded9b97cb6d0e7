"""Servers that failed recently, banned with exponential backoff so the router skips them at once.

A dead server's DHT records stay `online` until they expire; the ban is what keeps clients away
from it meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

logger = logging.getLogger(__name__)


class BanList:
    def __init__(self, base: float = 5.0, maximum: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.base = base
        self.maximum = maximum
        self._clock = clock
        self._until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}

    def ban(self, peer_id: str, reason: str) -> float:
        """Bans `peer_id` for base × 2^(strikes - 1) seconds (capped); returns the duration."""
        if self._until.get(peer_id) == float("inf"):
            return float("inf")
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = min(self.base * 2 ** (strikes - 1), self.maximum)
        self._until[peer_id] = self._clock() + duration
        logger.warning("banning server %s for %.0f s: %s", peer_id, duration, reason)
        return duration

    def ban_forever(self, peer_id: str, reason: str) -> None:
        """For a server proven to return wrong results: never used again by this process."""
        self._until[peer_id] = float("inf")
        logger.warning("banning server %s for good: %s", peer_id, reason)

    def succeeded(self, peer_id: str) -> None:
        """A server that works again starts from a clean slate."""
        self._strikes.pop(peer_id, None)

    def ends_in(self, peer_id: str) -> float:
        """Seconds until `peer_id`'s ban ends (0 if it is not banned, inf if banned for good)."""
        return max(self._until.get(peer_id, 0.0) - self._clock(), 0.0)

    def banned(self) -> set[str]:
        now = self._clock()
        return {peer for peer, until in self._until.items() if until > now}
