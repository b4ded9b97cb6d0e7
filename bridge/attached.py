"""The side of a server behind NAT: is it reachable at all (dial-back), and the bridges it stays
attached to so that others can reach it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, Iterable, Optional

from hivemind.p2p import P2P

from bridge.frames import (
    CIRCUIT_ATTACH,
    CIRCUIT_DIAL_BACK,
    COPY_BYTES,
    Attach,
    DialBack,
    Reply,
    bridge_id,
    close,
    dial_bridge,
    receive,
    send,
)

logger = logging.getLogger(__name__)


async def ask_dial_back(p2p: P2P, peers: Iterable[str], ports: list[int], timeout: float = 10.0) -> Optional[Reply]:
    """Asks the nodes at `peers` (full multiaddrs), in turn, whether they can dial this node back;
    the first answer, or None when none answers."""
    for addr in peers:
        try:
            peer = await dial_bridge(p2p, addr, timeout)
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, CIRCUIT_DIAL_BACK), timeout)
            try:
                await send(writer, DialBack(ports=tuple(ports[:4])))
                reply = await asyncio.wait_for(receive(reader, Reply), timeout)
            finally:
                close(writer)
            if reply.ok:
                return reply
            logger.info("%s could not check reachability: %s", addr, reply.error)
        except Exception as e:
            logger.info("no reachability answer from %s: %s: %s", addr, type(e).__name__, e)
    return None


class BridgeAttachment:
    """Keeps an unreachable server attached to `want` bridges at once (so that clients can fail
    over to another as soon as one dies), topping up from `candidates` whenever one is lost and every
    `retry` seconds while fewer are held. `on_change` gets the bridge addresses held after each change
    (the server announces them: each bridge detaches a server whose record does not name it soon);
    `claim()` is the (model, first block) this server serves, where a bridge looks for that record."""

    def __init__(
        self,
        p2p: P2P,
        candidates: Callable[[], Awaitable[list[str]]],
        on_change: Callable[[tuple[str, ...]], Awaitable[None]],
        claim: Callable[[], tuple[str, int]],
        want: int = 2,
        timeout: float = 10.0,
        retry: float = 10.0,
    ):
        self.p2p = p2p
        self.claim = claim
        self.candidates = candidates
        self.on_change = on_change
        self.want = want
        self.timeout = timeout
        self.retry = retry
        self._held: dict[str, asyncio.Task] = {}  # bridge address -> the task holding its attach stream
        self._failed: dict[str, float] = {}  # bridge address -> when it last failed (tried last next time)
        self._lost = asyncio.Event()

    @property
    def bridges(self) -> tuple[str, ...]:
        return tuple(self._held)

    async def run(self) -> None:
        try:
            while True:
                await self.top_up()
                self._lost.clear()
                wait = None if len(self._held) >= self.want else self.retry
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), wait)
                if self._lost.is_set():
                    await self.on_change(self.bridges)
        finally:
            for task in self._held.values():
                task.cancel()

    async def top_up(self) -> None:
        """Attaches to candidates, failed ones last, until `want` bridges are held (or none is left)."""
        if len(self._held) >= self.want:
            return
        held = {bridge_id(addr) for addr in self._held}  # bridge ids: a bridge may announce several addresses
        candidates = [addr for addr in await self.candidates() if bridge_id(addr) not in held]
        if not candidates and not self._held:
            logger.warning("no bridge to attach to yet; this server is unreachable until one appears")
        for addr in sorted(candidates, key=lambda addr: self._failed.get(addr, 0.0)):
            if bridge_id(addr) in held:
                continue  # another address of a bridge it has just attached to
            stream = await self._attach(addr)
            if stream is None:
                continue
            logger.info("attached to bridge %s", addr)
            held.add(bridge_id(addr))
            self._held[addr] = asyncio.create_task(self._hold(addr, *stream), name=f"bridge {addr[-6:]}")
            await self.on_change(self.bridges)
            if len(self._held) >= self.want:
                return

    async def _hold(self, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(COPY_BYTES):  # the bridge sends nothing; this ends when it goes away
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            close(writer)
            if self._held.get(addr) is asyncio.current_task():
                del self._held[addr]
                self._failed[addr] = time.monotonic()
                logger.warning("lost bridge %s; %d left, attaching to another", addr, len(self._held))
                self._lost.set()

    async def _attach(self, addr: str) -> Optional[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            peer = await dial_bridge(self.p2p, addr, self.timeout)
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(peer, CIRCUIT_ATTACH), self.timeout
            )
            model, start_block = self.claim()
            await send(writer, Attach(model=model, start_block=start_block))
            reply = await asyncio.wait_for(receive(reader, Reply), self.timeout)
        except Exception as e:
            logger.info("bridge %s unavailable: %s: %s", addr, type(e).__name__, e)
            self._failed[addr] = time.monotonic()
            return None
        if not reply.ok:
            logger.info("bridge %s refused: %s", addr, reply.error)
            self._failed[addr] = time.monotonic()
            close(writer)
            return None
        return reader, writer
