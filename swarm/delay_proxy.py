"""A TCP proxy that delays every byte by a fixed one-way time: a local swarm that behaves like one on a WAN.

This kernel has no `netem`; a proxy in front of each local server, announced through
`--announce-maddrs`, makes every connection to that server cross a link of `delay` seconds each
way. Data keeps its order and is never dropped; bandwidth is not limited. Loopback only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024


class DelayProxy:
    """Listens on `host:port` (0: a free port) and forwards each connection to `target_port` on the same host."""

    def __init__(self, target_port: int, delay: float, host: str = "127.0.0.1", port: int = 0):
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.host, self.target_port, self.delay = host, target_port, delay
        self.port = port
        self.bytes_forwarded = 0
        self._server: Optional[asyncio.base_events.Server] = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError as e:
            logger.debug("delay proxy: target port %d refused: %s", self.target_port, e)
            client_writer.close()
            return
        task = asyncio.create_task(self._connection(client_reader, client_writer, target_reader, target_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_reader, client_writer, target_reader, target_writer) -> None:
        try:
            await asyncio.gather(self._pipe(client_reader, target_writer), self._pipe(target_reader, client_writer))
        finally:
            client_writer.close()
            target_writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads as data comes and writes each chunk `delay` after it was read, in order."""
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.create_task(self._send_later(queue, writer))
        try:
            while True:
                data = await reader.read(_CHUNK)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        except (ConnectionError, asyncio.CancelledError):
            sender.cancel()
            writer.close()

    async def _send_later(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                self.bytes_forwarded += len(data)
                await writer.drain()
        except ConnectionError:
            writer.close()


class DelayProxyThread:
    """`DelayProxy` on its own event loop thread, for synchronous callers such as `LocalSwarm`."""

    def __init__(self, target_port: int, delay: float, port: int = 0):
        self.proxy = DelayProxy(target_port, delay, port=port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(timeout=30)

    @property
    def bytes_forwarded(self) -> int:
        return self.proxy.bytes_forwarded

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
