"""Server-to-server push: one stream from this server to the next server of a client's chain per
session, carrying each step's output as soon as it is computed.

A stream, not a call per step: opening a libp2p stream costs a negotiation each time, which on
loopback made a pushed chain slower than the client relaying outputs itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from bridge.dial import iterate, reach
from protocol.errors import WireError
from protocol.messages import RPC_PUSH_STREAM, Hop, PushAccepted, read_header

logger = logging.getLogger(__name__)


class PushStream:
    """Steps of one session to one later server, in order; failures are logged, not raised (the client
    notices the next server's silence and fails over as for any failure)."""

    def __init__(self, p2p: P2P, hop: Hop, timeout: float):
        self.hop = hop
        self._p2p = p2p
        self._timeout = timeout
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name=f"push to {hop.peer_id[-6:]}")

    def send(self, message: runtime_pb2.ExpertRequest) -> None:
        self._queue.put_nowait(message)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def _requests(self):
        while (message := await self._queue.get()) is not None:
            yield message

    async def _run(self) -> None:
        try:
            target = await reach(self._p2p, self.hop.peer_id, self.hop.addrs, self.hop.bridge_addrs, self._timeout)
            replies = await asyncio.wait_for(
                iterate(self._p2p, target, RPC_PUSH_STREAM, self._requests()), self._timeout
            )
            async for reply in replies:
                read_header(reply, PushAccepted)
        except WireError as e:
            logger.warning("push to %s refused: %s: %s", self.hop.peer_id, e.kind.value, e.message)
        except Exception as e:
            logger.warning("push to %s failed: %s: %s", self.hop.peer_id, type(e).__name__, e)


class LocalPush:
    """Steps pushed into another session of this same server: a chain may use one server for two
    spans (after a failover, say), and libp2p does not dial itself."""

    def __init__(self, hop: Hop, accept: Callable[[runtime_pb2.ExpertRequest], str]):
        self.hop = hop
        self._accept = accept

    def send(self, message: runtime_pb2.ExpertRequest) -> None:
        try:
            self._accept(message)
        except WireError as e:
            logger.warning("push to this server's own session refused: %s: %s", e.kind.value, e.message)

    def close(self) -> None:
        pass
