"""The client's end of one server's RPC stream: dialing the server (or one of its bridges) and a
queue of requests feeding the stream, with its replies read one at a time. Every stream to one
server is a channel of one libp2p stream (`bridge.channels`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable, Collection, Optional

from hivemind.p2p import P2P

from bridge.channels import iterate_channel
from bridge.dial import Target, reach
from client.errors import ServerFailure
from client.routing import SpanPlan

logger = logging.getLogger(__name__)

# A pushed step's reply that takes longer than this makes the client write a small `Expect` on the
# server's stream: a write to a dead server fails at once, where a read might wait out the whole timeout.
NUDGE_AFTER = 1.0


async def connect(p2p: P2P, plan: SpanPlan, timeout: float, avoid_bridges: Collection[str] = ()) -> Target:
    """Dials the server of `plan`, or the first of its bridges that answers (those in `avoid_bridges`,
    which failed lately, only if no other is left); a failure is the server's."""
    record = plan.info.record
    bridges = [addr for addr in record.bridge_addrs if addr not in avoid_bridges] or list(record.bridge_addrs)
    try:
        return await reach(p2p, plan.peer_id, record.addrs, bridges, timeout)
    except Exception as e:
        raise ServerFailure(plan.peer_id, f"cannot connect: {e}") from e


class RequestStream:
    """A request queue feeding a hivemind protobuf stream, and its replies, read as they come by one
    task: replies that `is_notice` picks (the server's unasked notices) go to `notices`, the others
    are `receive`d in order."""

    def __init__(self, is_notice: Callable[[Any], bool] = lambda reply: False) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self.replies: Optional[AsyncIterator] = None
        self.is_notice = is_notice
        self.notices: asyncio.Queue = asyncio.Queue()
        self._replies: asyncio.Queue = asyncio.Queue()  # replies, then None or the error that ended the stream
        self._reader: Optional[asyncio.Task] = None

    async def _requests(self):
        while True:
            message = await self._queue.get()
            if message is None:
                return
            yield message

    async def open(self, p2p: P2P, target: Target, handler: str, fresh: bool = False) -> None:
        """Opens the stream: a channel of this process's bundle stream to the server (`fresh`: of a new one)."""
        self.attach(await iterate_channel(p2p, target, handler, self._requests(), fresh))

    def attach(self, replies: AsyncIterator) -> None:
        """Starts reading `replies`, the open stream's reply iterator."""
        self.replies = replies
        self._reader = asyncio.create_task(self._read(replies), name="stream replies")

    async def _read(self, replies: AsyncIterator) -> None:
        try:
            async for reply in replies:
                (self.notices if self.is_notice(reply) else self._replies).put_nowait(reply)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the next `receive`, which raises it as the stream's failure
            self._replies.put_nowait(e)
            return
        self._replies.put_nowait(None)

    def send(self, message) -> None:
        self._queue.put_nowait(message)

    async def receive(self, timeout: float, nudge: Optional[Callable[[], None]] = None):
        """The next reply; `nudge` is called once if none has come within `NUDGE_AFTER` seconds."""
        late = (
            asyncio.get_running_loop().call_later(NUDGE_AFTER, nudge)
            if nudge is not None and NUDGE_AFTER < timeout
            else None
        )
        try:
            reply = await asyncio.wait_for(self._replies.get(), timeout)
        finally:
            if late is not None:
                late.cancel()
        if reply is None or isinstance(reply, Exception):
            self._replies.put_nowait(reply)  # the stream stays ended for any later receive
            if reply is None:
                raise ConnectionError("stream closed by the server")
            raise reply
        return reply

    async def close(self) -> None:
        self._queue.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        if self.replies is not None:
            try:
                await self.replies.aclose()
            except Exception:
                logger.debug("error while closing a stream", exc_info=True)
