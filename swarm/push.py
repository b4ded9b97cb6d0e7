"""Server-to-server push: one stream from this server to the next server of a client's chain per
session, carrying each step's output as soon as it is computed.

A stream, not a call per step: opening a libp2p stream costs a negotiation each time, which on
loopback made a pushed chain slower than the client relaying outputs itself. Each session's push
stream is a channel of one bundle stream to the next server (`bridge.channels`), so the pushes of
one batching round go to it as one message.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from bridge.channels import iterate_channel
from bridge.dial import reach
from protocol.errors import WireError
from protocol.messages import RPC_PUSH_STREAM, Hop, PushAccepted, read_header

logger = logging.getLogger(__name__)


# How long a push waits to reach the next server: past it, the link counts as failed and the client is told.
PUSH_DIAL_TIMEOUT = 15.0


class PushStream:
    """Steps of one session to one later server, in order. A failure (the next server cannot be reached,
    its stream breaks, or it refuses the stream) is not raised: `failed(reason)` is called once, at
    once, so that the client hears of it and sends that hop's steps itself."""

    def __init__(self, p2p: P2P, hop: Hop, failed: Callable[[str], None], dial_timeout: float = PUSH_DIAL_TIMEOUT):
        self.hop = hop
        self._p2p = p2p
        self._failed = failed
        self._timeout = dial_timeout
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
                iterate_channel(self._p2p, target, RPC_PUSH_STREAM, self._requests()), self._timeout
            )
            async for reply in replies:
                read_header(reply, PushAccepted)
        except asyncio.CancelledError:
            raise
        except WireError as e:
            logger.warning("push to %s refused: %s: %s", self.hop.peer_id, e.kind.value, e.message)
            self._failed(f"refused: {e.message}")
        except Exception as e:
            logger.warning("push to %s failed: %s: %s", self.hop.peer_id, type(e).__name__, e)
            self._failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


class LocalPush:
    """Steps pushed into another session of this same server: a chain may use one server for two
    spans (after a failover, say), and libp2p does not dial itself."""

    def __init__(self, hop: Hop, accept: Callable[[runtime_pb2.ExpertRequest], str], failed: Callable[[str], None]):
        self.hop = hop
        self._accept = accept
        self._failed = failed

    def send(self, message: runtime_pb2.ExpertRequest) -> None:
        try:
            self._accept(message)
        except WireError as e:
            logger.warning("push to this server's own session refused: %s: %s", e.kind.value, e.message)
            self._failed(f"refused: {e.message}")

    def close(self) -> None:
        pass
