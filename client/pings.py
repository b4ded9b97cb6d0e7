"""Round-trip times to servers, measured with the info call, cached and refreshed."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, Optional

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from blocks.wire import RPC_INFO
from client.routing import SpanPlan
from client.span import connect
from dht.records import ServerInfo

logger = logging.getLogger(__name__)


class PingCache:
    """`unreachable(peer_id, reason)` is called for a server that does not answer (a client bans it)."""

    def __init__(self, p2p: P2P, unreachable: Callable[[str, str], None] = lambda peer, reason: None,
                 max_age: float = 60.0, timeout: float = 3.0):
        self.p2p = p2p
        self.unreachable = unreachable
        self.max_age = max_age
        self.timeout = timeout
        self._rtts: dict[str, tuple[float, float]] = {}  # peer -> (rtt, measured at)

    def forget(self, peer_id: str) -> None:
        """Drops a measurement, so the server is pinged again before it is chosen."""
        self._rtts.pop(peer_id, None)

    def rtts(self) -> dict[str, float]:
        return {peer: rtt for peer, (rtt, _) in self._rtts.items()}

    async def refresh(self, servers: Iterable[ServerInfo]) -> None:
        """Pings, concurrently, every server whose measurement is missing or stale."""
        now = time.monotonic()
        stale = {info.peer_id: info for info in servers
                 if info.peer_id not in self._rtts or now - self._rtts[info.peer_id][1] > self.max_age}
        await asyncio.gather(*(self._ping(info) for info in stale.values()))

    async def _ping(self, info: ServerInfo) -> Optional[float]:
        plan = SpanPlan(info.peer_id, info.record.start_block, info.record.end_block, info)
        started = time.monotonic()
        try:
            peer = await connect(self.p2p, plan, self.timeout)
            await asyncio.wait_for(
                self.p2p.call_protobuf_handler(peer, RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse),
                self.timeout,
            )
        except Exception as e:
            self.forget(info.peer_id)
            self.unreachable(info.peer_id, f"ping failed: {type(e).__name__}: {e}")
            return None
        rtt = time.monotonic() - started
        self._rtts[info.peer_id] = (rtt, time.monotonic())
        return rtt
