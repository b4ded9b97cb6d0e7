"""What a failure costs, and how many one step may survive.

A server's failure bans it with backoff and forgets its ping; a failure through a bridge may be the
bridge's, so that bridge is avoided for a while first. One step (a prompt, or one new token) has one
budget of server failures and one deadline, whatever part of it fails (a step, a reconnection, a
cache replay), so nested retries cannot multiply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Optional

from client.bans import BanList
from client.errors import RetriesExhaustedError, StepTimeoutError, SwarmError
from client.pings import PingCache
from dht.records import ServerInfo

logger = logging.getLogger(__name__)

BRIDGE_AVOID_SECONDS = 60.0  # a bridge that failed is tried last for this long


class FailureBudget:
    """The failures one step may survive, wherever they happen (a step, a reconnect, a replay): one
    count, so nested retries cannot multiply into (retries + 1)² attempts."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def add(self, error: SwarmError) -> None:
        self.count += 1
        if self.count > self.limit:
            raise RetriesExhaustedError(f"gave up after {self.count} server failures; last: {error}") from error


@contextlib.asynccontextmanager
async def step_deadline(seconds: Optional[float], what: str) -> AsyncIterator[None]:
    """Raises StepTimeoutError if the body runs past `seconds` (None: no deadline)."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    except TimeoutError as e:
        if not deadline.expired():
            raise
        raise StepTimeoutError(
            f"the {what} did not finish within step_timeout={seconds:g} s (retries and failovers included)"
        ) from e


class FailurePolicy:
    """Bans failed servers. `latest_record(peer)` is the server's record in the latest DHT read (which
    bridges it announces); `listeners` hear of every server banned for failing or for a wrong result;
    `on_ban` hooks hear of failures only (checks waiting on that server give up)."""

    def __init__(self, bans: BanList, pings: PingCache, latest_record: Callable[[str], Optional[ServerInfo]]):
        self.bans = bans
        self.pings = pings
        self.latest_record = latest_record
        self.listeners: list[Callable[[str, str], None]] = []
        self.on_ban: list[Callable[[str], None]] = []
        self._failed_bridges: dict[str, float] = {}  # bridge address -> avoided until (monotonic)

    def report(self, peer_id: str, reason: str, bridge: str = "") -> None:
        """Bans a failed server with backoff and forgets its ping, so it is re-checked before reuse.

        A failure through a bridge may be the bridge's: that bridge is avoided for a while, and the
        server is banned only if it announces no other bridge that has not failed lately."""
        if bridge:
            now = time.monotonic()
            self._failed_bridges[bridge] = now + BRIDGE_AVOID_SECONDS
            if self._other_bridge(peer_id, now):
                logger.warning(
                    "server %s failed through bridge %s; trying its other bridges (%s)", peer_id, bridge, reason
                )
                self.pings.forget(peer_id)
                return
        self.bans.ban(peer_id, reason)
        self.pings.forget(peer_id)
        for hook in self.on_ban:
            hook(peer_id)
        self.notify(peer_id, reason)

    def notify(self, peer_id: str, reason: str) -> None:
        for listener in self.listeners:
            listener(peer_id, reason)

    def bridges_to_avoid(self) -> frozenset[str]:
        """Bridges that failed in the last BRIDGE_AVOID_SECONDS."""
        now = time.monotonic()
        return frozenset(bridge for bridge, until in self._failed_bridges.items() if until > now)

    def _other_bridge(self, peer_id: str, now: float) -> bool:
        """Whether the latest read of `peer_id`'s record lists a bridge that has not failed lately."""
        info = self.latest_record(peer_id)
        bridges = info.record.bridge_addrs if info is not None else ()
        return any(self._failed_bridges.get(bridge, 0.0) <= now for bridge in bridges)
