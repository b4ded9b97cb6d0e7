"""Many RPC streams to one peer over one libp2p stream, in bundles (`protocol.bundles`).

The caller's side, `iterate_channel`, is `bridge.dial.iterate` for a stream that shares its peer's
bundle stream with every other stream this process has open to that peer (bridged or not); the
peer's side, `serve_channels`, runs each channel's RPC handler as if it had its own stream. A writer
on either side sends, in one bundle, every message queued while the event loop ran what was ready:
the sessions of one batching round finish together, so a round's steps, pushes and replies each go
as one message per hop.

A channel fails alone when its handler fails or it falls too far behind; a bundle stream that breaks
or carries garbage fails every channel on it, as each stream would have failed on its own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from typing import Any, AsyncIterator, Callable, Optional

from hivemind.p2p import P2P, P2PContext

from bridge.dial import Target, iterate
from protocol.bundles import Part, pack_bundle, part_of, unpack_bundle
from protocol.errors import ErrorKind, MalformedMessage, WireError, bad_request
from protocol.messages import RPC_BUNDLE, error_response
from protocol.tensors import MAX_MESSAGE_BYTES, message_bytes

logger = logging.getLogger(__name__)

# Channels open at once on one bundle stream, as its serving side allows.
MAX_CHANNELS = 1024
# Messages a channel's handler may leave unread before the channel is refused (a session's reader
# keeps only a few steps ahead; a caller that sends far more is not waiting for its replies).
MAX_UNREAD = 256
# Bytes (headers and tensors) a bundle stream's handlers may leave unread before the next bundle waits.
MAX_UNREAD_BYTES = 2 * MAX_MESSAGE_BYTES
# A bundle is sent once its parts' headers or tensors pass these (a single larger message goes alone).
BUNDLE_HEADER_BYTES = 256 * 1024
BUNDLE_TENSOR_BYTES = MAX_MESSAGE_BYTES // 2
# How long a caller waits for the peer to end a bundle stream whose last channel has ended.
CLOSE_LINGER = 30.0
# How long a bundle stream refused with an error stays open for the caller to read it and hang up.
FAILED_LINGER = 10.0
# Event-loop turns a writer waits for more parts while each turn still brings some.
COLLECT_TURNS = 4

Handler = Callable[[AsyncIterator, P2PContext], Any]


class _Outbox:
    """Parts waiting to go, sent in bundles: each bundle takes the parts queued until an event-loop
    turn brings no more (at most `COLLECT_TURNS`), within the size limits."""

    def __init__(self, request: bool):
        self._request = request
        self._parts: list[tuple[Part, Any]] = []
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, part: tuple[Part, Any]) -> None:
        self._parts.append(part)
        self._ready.set()

    def close(self) -> None:
        """Sends what is queued, then ends."""
        self.closed = True
        self._ready.set()

    async def bundles(self) -> AsyncIterator[Any]:
        while True:
            await self._ready.wait()
            for _ in range(COLLECT_TURNS):
                queued = len(self._parts)
                await asyncio.sleep(0)
                if len(self._parts) == queued:
                    break
            self._ready.clear()
            parts, self._parts = self._parts, []
            for group in _groups(parts):
                yield pack_bundle(group, request=self._request)
            if self.closed and not self._parts:
                return


def _groups(parts: list[tuple[Part, Any]]) -> list[list[tuple[Part, Any]]]:
    """`parts` in bundles within the size limits, in order."""
    groups: list[list[tuple[Part, Any]]] = [[]]
    header = tensors = 0
    for part in parts:
        size = len(part[0].metadata or b"") + 32
        carried = message_bytes(part[1]) if part[1] is not None else 0
        if groups[-1] and (header + size > BUNDLE_HEADER_BYTES or tensors + carried > BUNDLE_TENSOR_BYTES):
            groups.append([])
            header = tensors = 0
        groups[-1].append(part)
        header += size
        tensors += carried
    return groups if groups[0] else []


# ---- the caller's side ---------------------------------------------------------------------------


class _Channel:
    """The caller's end of one channel: its replies (None once the channel ended; an exception once
    it or its bundle stream failed)."""

    def __init__(self, link: "_Link", number: int, handler: str):
        self.link = link
        self.number = number
        self.handler = handler
        self.replies: asyncio.Queue = asyncio.Queue()
        self.opened = False
        self.ended = False  # the caller sends nothing more
        self.finished = False  # the peer sent the channel's last reply

    def send(self, message: Any = None, end: bool = False) -> None:
        if self.link.broken is not None or self.ended:
            return
        opening = "" if self.opened else self.handler
        self.opened = True
        self.ended = end
        self.link.outbox.put(part_of(self.number, message, open=opening, end=end))

    async def pump(self, requests: AsyncIterator) -> None:
        """Sends `requests` as they come, then ends the channel's requests."""
        async for message in requests:
            if self.finished:
                return
            self.send(message)
        self.send(end=True)

    def leave(self) -> None:
        """The caller is done with the channel: its requests end there, as a stream's do when its
        caller closes it (the handler finishes as it would then; its later replies are dropped)."""
        if self.opened and not self.finished:
            self.send(end=True)
        self.finished = True
        self.link.drop(self)


class _Link:
    """One bundle stream to one peer, carrying every channel this process opens to it."""

    def __init__(self, p2p: P2P, target: Target, forget: Callable[["_Link"], None]):
        self.outbox = _Outbox(request=True)
        self.channels: dict[int, _Channel] = {}
        self.broken: Optional[BaseException] = None
        self._numbers = 0
        self._forget = forget
        self._replies: Optional[AsyncIterator] = None
        self._reader: Optional[asyncio.Task] = None
        self.opened = asyncio.ensure_future(self._open(p2p, target))

    async def _open(self, p2p: P2P, target: Target) -> None:
        try:
            self._replies = await iterate(p2p, target, RPC_BUNDLE, self.outbox.bundles())
        except BaseException as e:
            self._fail(e)
            raise
        self._reader = asyncio.create_task(self._read(self._replies), name=f"bundles from {target.peer_id[-6:]}")

    def channel(self, handler: str) -> _Channel:
        if self.broken is not None:
            raise ConnectionError(f"bundle stream failed: {self.broken}")
        self._numbers += 1
        channel = self.channels[self._numbers] = _Channel(self, self._numbers, handler)
        return channel

    def drop(self, channel: _Channel) -> None:
        """Forgets a channel; the stream closes with the last: its requests end once the last
        channel's end is sent, and the peer ends it once its handlers have finished (or after
        `CLOSE_LINGER` seconds, this side does)."""
        self.channels.pop(channel.number, None)
        if not self.channels and self.broken is None:
            self.broken = ConnectionError("bundle stream closed")
            self._forget(self)
            self.outbox.close()
            if self._reader is not None:
                asyncio.get_running_loop().call_later(CLOSE_LINGER, self._reader.cancel)
            else:
                self.opened.cancel()

    async def _read(self, replies: AsyncIterator) -> None:
        try:
            async for bundle in replies:
                for part, message in unpack_bundle(bundle, request=False):
                    self._deliver(part, message)
            raise ConnectionError("the peer closed the bundle stream")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)
        finally:
            await _closed(replies)

    def _deliver(self, part: Part, message: Any) -> None:
        channel = self.channels.get(part.channel)
        if channel is None:
            if part.channel > self._numbers:
                raise MalformedMessage(f"a reply on channel {part.channel}, which was never opened")
            return  # a channel its caller has left
        if part.open:
            raise MalformedMessage("a reply that opens a channel")
        if message is not None:
            channel.replies.put_nowait(message)
        if part.end:
            channel.finished = True
            channel.replies.put_nowait(None)

    def _fail(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
            self._forget(self)
        for channel in self.channels.values():
            channel.finished = True
            channel.replies.put_nowait(error)
        self.channels.clear()


_links: "weakref.WeakKeyDictionary[P2P, dict[Target, _Link]]" = weakref.WeakKeyDictionary()
# Peers that do not take bundles (an earlier version, or a bridge that does not carry them).
_plain: "weakref.WeakKeyDictionary[P2P, set[str]]" = weakref.WeakKeyDictionary()


def _without_bundles(error: Exception) -> bool:
    """Whether opening a bundle stream failed because the peer (or its bridge) does not speak it:
    libp2p found no such protocol there, or the bridge does not carry it."""
    message = str(error)
    return "protocols not supported" in message or f"not {RPC_BUNDLE!r}" in message


async def iterate_channel(
    p2p: P2P, target: Target, handler: str, requests: AsyncIterator, fresh: bool = False
) -> AsyncIterator:
    """`bridge.dial.iterate(p2p, target, handler, requests)` on a channel of this process's bundle
    stream to `target` (opened with the first channel, closed with the last): the same messages both
    ways. Closing the returned iterator before the replies end stops the handler. With `fresh`, on a
    new bundle stream, which later channels share (a retry after a timeout: rarely, libp2p loses a new
    stream's first message, and the stream with it); channels already open keep the one they are on."""
    if target.peer_id in _plain.get(p2p, ()):
        return await iterate(p2p, target, handler, requests)
    links = _links.setdefault(p2p, {})
    link = links.get(target)
    if link is None or fresh:

        def forget(gone: _Link) -> None:
            if links.get(target) is gone:
                del links[target]

        link = links[target] = _Link(p2p, target, forget)
    channel = link.channel(handler)
    try:
        await asyncio.shield(link.opened)
    except Exception as e:
        channel.leave()
        if not _without_bundles(e):
            raise
        # A peer of an earlier version: its streams stay streams of their own.
        logger.info("%s does not take bundles (%s); its streams go on their own", target.peer_id, e)
        _plain.setdefault(p2p, set()).add(target.peer_id)
        return await iterate(p2p, target, handler, requests)
    except BaseException:
        channel.leave()
        raise
    pump = asyncio.create_task(channel.pump(requests), name=f"{handler.rsplit('.', 1)[-1]} requests")
    return _Replies(channel, pump)


class _Replies:
    """A channel's replies, as `iterate` returns a stream's: they end when the channel does, raise
    what failed it, and `aclose` (even before the first) leaves the channel."""

    def __init__(self, channel: _Channel, pump: asyncio.Task):
        self._channel = channel
        self._pump = pump
        self._done = False

    def __aiter__(self) -> "_Replies":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        reply = await self._channel.replies.get()
        if reply is None or isinstance(reply, BaseException):
            await self.aclose()
            if reply is None:
                raise StopAsyncIteration
            raise reply
        return reply

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._pump.cancel()
            self._channel.leave()


async def _closed(replies: AsyncIterator) -> None:
    try:
        await replies.aclose()
    except Exception:
        logger.debug("error while closing a bundle stream", exc_info=True)


# ---- the serving side ----------------------------------------------------------------------------


class _Inbox:
    """A channel's requests its handler has not read yet, their bytes counted on the stream."""

    def __init__(self, stream: "_Served"):
        self._stream = stream
        self._queue: asyncio.Queue = asyncio.Queue()
        self.bytes = 0
        self.task: Optional[asyncio.Task] = None

    def __len__(self) -> int:
        return self._queue.qsize()

    def put(self, message: Any) -> None:
        """Queues a request (None: the requests end)."""
        self._count(_size(message) if message is not None else 0)
        self._queue.put_nowait(message)

    async def requests(self) -> AsyncIterator:
        while (message := await self._queue.get()) is not None:
            self._count(-_size(message))
            yield message

    def discard(self) -> None:
        """The channel has ended: what it left unread no longer counts."""
        self._count(-self.bytes)

    def _count(self, size: int) -> None:
        self.bytes += size
        self._stream.unread += size
        if size < 0:
            self._stream.drained.set()


def _size(message: Any) -> int:
    return len(message.metadata) + message_bytes(message)


class _Served:
    """One caller's bundle stream: each channel's handler running on its own requests."""

    def __init__(self, handlers: dict[str, Handler], context: P2PContext):
        self.handlers = handlers
        self.context = context
        self.outbox = _Outbox(request=False)
        self.live: dict[int, _Inbox] = {}
        self.highest = 0  # the highest channel number opened so far: lower ones are live or done
        self.ended = False  # the caller sends no more bundles
        self.failure: Optional[WireError] = None
        self.unread = 0  # bytes of requests queued for the channels' handlers, not read by them yet
        self.drained = asyncio.Event()

    async def read(self, requests: AsyncIterator) -> None:
        try:
            async for bundle in requests:
                for part, message in unpack_bundle(bundle, request=True):
                    self._dispatch(part, message)
                while self.unread > MAX_UNREAD_BYTES:  # the next bundle waits until the handlers catch up
                    self.drained.clear()
                    await self.drained.wait()
        except WireError as e:
            logger.info("bundle stream from %s refused: %s", self.context.remote_id, e.message)
            self._fail(e)
            return
        except Exception as e:
            logger.warning("bundle stream from %s failed", self.context.remote_id, exc_info=True)
            self._fail(WireError(ErrorKind.SERVER_ERROR, f"bundle stream failed: {type(e).__name__}"))
            return
        self.ended = True
        if not self.live:
            self.outbox.close()

    def _dispatch(self, part: Part, message: Any) -> None:
        inbox = self.live.get(part.channel)
        if inbox is None:
            if part.channel <= self.highest:
                return  # a channel that has ended here: what the caller sent meanwhile is dropped
            self.highest = part.channel
            inbox = self._start(part)
            if inbox is None:
                return
        if message is not None:
            if len(inbox) >= MAX_UNREAD:
                self._refuse(part.channel, bad_request(f"more than {MAX_UNREAD} messages on one channel left unread"))
                return
            inbox.put(message)
        if part.end:
            inbox.put(None)

    def _start(self, part: Part) -> Optional[_Inbox]:
        """Starts a new channel's handler; None if the channel is refused (it is told why)."""
        handler = self.handlers.get(part.open)
        if handler is None:
            error = bad_request(f"channel {part.channel} opens {part.open!r}, not one of {sorted(self.handlers)}")
        elif len(self.live) >= MAX_CHANNELS:
            error = WireError(ErrorKind.BUSY, f"{MAX_CHANNELS} channels are open on this bundle stream already")
        else:
            inbox = self.live[part.channel] = _Inbox(self)
            inbox.task = asyncio.create_task(self._run(part.channel, handler, inbox), name=f"channel {part.channel}")
            return inbox
        self.outbox.put(part_of(part.channel, error_response(error), end=True))
        return None

    def _refuse(self, number: int, error: WireError) -> None:
        """Stops a channel's handler and tells the caller why."""
        self._drop(number)
        self.outbox.put(part_of(number, error_response(error), end=True))

    def _drop(self, number: int) -> bool:
        """Forgets a live channel, stopping its handler; False if it was not live."""
        inbox = self.live.pop(number, None)
        if inbox is None:
            return False
        inbox.discard()
        if inbox.task is not None and inbox.task is not asyncio.current_task():
            inbox.task.cancel()
        return True

    async def _run(self, number: int, handler: Handler, inbox: _Inbox) -> None:
        try:
            output = handler(inbox.requests(), self.context)
            if inspect.isasyncgen(output):
                async for reply in output:
                    self.outbox.put(part_of(number, reply))
            else:
                self.outbox.put(part_of(number, await output))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # as hivemind answers a stream whose handler raised
            logger.warning("channel %d of %s failed", number, self.context.remote_id, exc_info=True)
            self.outbox.put(part_of(number, error_response(WireError(ErrorKind.SERVER_ERROR, f"{type(e).__name__}"))))
        if self._drop(number):
            self.outbox.put(part_of(number, end=True))
        if self.ended and not self.live:
            self.outbox.close()

    def _fail(self, error: WireError) -> None:
        """Ends the stream with `error`: every channel on it stops."""
        self.failure = error
        self.stop()
        self.outbox.close()

    def stop(self) -> None:
        for number in list(self.live):
            self._drop(number)


async def serve_channels(
    requests: AsyncIterator, context: P2PContext, handlers: dict[str, Handler]
) -> AsyncIterator[Any]:
    """The serving side of a bundle stream: runs `handlers[rpc]` (a stream handler, as registered
    with hivemind) for each channel the caller opens, and yields the bundles of their replies. A
    bundle that does not parse ends the stream with an error reply (every channel on it stops)."""
    served = _Served(handlers, context)
    reading = asyncio.create_task(served.read(requests), name=f"bundles from {str(context.remote_id)[-6:]}")
    try:
        async for bundle in served.outbox.bundles():
            yield bundle
        if served.failure is not None:
            yield error_response(served.failure)
            # The error must reach the caller: a stream this side closes can be reset before the
            # daemons pass its last message on. The caller hangs up once it has read it.
            await asyncio.sleep(FAILED_LINGER)
    finally:
        reading.cancel()
        served.stop()
