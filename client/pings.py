"""Round-trip times to servers, measured with the info call, cached and refreshed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, Optional

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from bridge.dial import call
from client.routing import SpanPlan
from client.streams import connect
from dht.records import ServerInfo
from protocol.messages import RPC_INFO

logger = logging.getLogger(__name__)


class PingCache:
    """`unreachable(peer_id, reason)` is called for a server that refuses or drops the connection (a
    client bans it). A server that is merely silent for `timeout` is not banned: a loaded machine can
    be slow to answer its first ping, and banning it would hide the only server of some blocks. It is
    routed as if its round trip were `timeout` (so answering servers win) and pinged again after
    `retry_silent` seconds, twice that after a second silence, and so on up to `max_age`."""

    def __init__(
        self,
        p2p: P2P,
        unreachable: Callable[[str, str], None] = lambda peer, reason: None,
        max_age: float = 60.0,
        timeout: float = 3.0,
        retry_silent: float = 10.0,
    ):
        self.p2p = p2p
        self.unreachable = unreachable
        self.max_age = max_age
        self.timeout = timeout
        self.retry_silent = min(retry_silent, max_age)
        self._rtts: dict[str, tuple[float, float]] = {}  # peer -> (rtt, measured at)
        self._silent: dict[str, tuple[float, int]] = {}  # peer -> (last unanswered ping, how many in a row)

    def forget(self, peer_id: str) -> None:
        """Drops a measurement, so the server is pinged again before it is chosen."""
        self._rtts.pop(peer_id, None)
        self._silent.pop(peer_id, None)

    def rtts(self) -> dict[str, float]:
        """Measured round trips only (what a health page shows)."""
        return {peer: rtt for peer, (rtt, _) in self._rtts.items()}

    def route_rtts(self) -> dict[str, float]:
        """Round trips for routing: measured ones, and `timeout` for servers that did not answer in time."""
        return {**{peer: self.timeout for peer in self._silent}, **self.rtts()}

    async def refresh(self, servers: Iterable[ServerInfo]) -> None:
        """Pings, concurrently, every server whose measurement is missing or stale."""
        now = time.monotonic()
        stale = {info.peer_id: info for info in servers if self._stale(info.peer_id, now)}
        await asyncio.gather(*(self._ping(info) for info in stale.values()))

    def _stale(self, peer_id: str, now: float) -> bool:
        if peer_id in self._silent:
            since, count = self._silent[peer_id]
            return now - since > min(self.max_age, self.retry_silent * 2 ** (count - 1))
        return peer_id not in self._rtts or now - self._rtts[peer_id][1] > self.max_age

    async def _ping(self, info: ServerInfo) -> Optional[float]:
        plan = SpanPlan(info.peer_id, info.record.start_block, info.record.end_block, info)
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._call(plan), self.timeout)
        except TimeoutError:
            logger.info(
                "server %s did not answer a ping within %.1f s; routing around it for now", info.peer_id, self.timeout
            )
            self._rtts.pop(info.peer_id, None)
            self._silent[info.peer_id] = (time.monotonic(), self._silent.get(info.peer_id, (0.0, 0))[1] + 1)
            return None
        except Exception as e:
            self.forget(info.peer_id)
            self.unreachable(info.peer_id, f"ping failed: {type(e).__name__}: {e}")
            return None
        rtt = time.monotonic() - started
        self._silent.pop(info.peer_id, None)
        self._rtts[info.peer_id] = (rtt, time.monotonic())
        return rtt

    async def _call(self, plan: SpanPlan) -> None:
        # The dial's own limit is longer than the whole ping's, so a slow dial counts as silence.
        target = await connect(self.p2p, plan, 2 * self.timeout)
        await call(self.p2p, target, RPC_INFO, runtime_pb2.ExpertRequest())
