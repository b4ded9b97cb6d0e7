"""A TCP proxy that delays every byte by a fixed one-way time: a local swarm that behaves like one on a WAN.

This kernel has no `netem`; a proxy in front of each local server, announced through
`--announce-maddrs`, makes every connection to that server cross a link of `delay` seconds each
way. Data keeps its order and is never dropped; bandwidth is not limited. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import select
import subprocess
import sys
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


class DelayProxyProcess:
    """`DelayProxy` in a process of its own, for synchronous callers such as `LocalSwarm`.

    Not a thread of the caller: a proxy that waits for the caller's GIL delays every byte by however
    long the caller's Python runs (measured: a round trip over 25 ms links took 88 ms with one busy
    thread beside a proxy thread, 62 ms beside a proxy process, 51 ms with no busy thread)."""

    def __init__(self, target_port: int, delay: float, port: int = 0, start_timeout: float = 60.0):
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.target_port = target_port
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "swarm.delay_proxy", "--target-port", str(target_port),
             "--delay-ms", repr(delay * 1000), "--port", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_raise_priority,
        )
        try:
            self.port = int(self._answer(start_timeout))
        except BaseException:
            self.close()
            raise

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        line = self._process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"delay proxy for port {self.target_port} did not answer (exit code {self._process.poll()})")
        return line.strip()

    @property
    def bytes_forwarded(self) -> int:
        with self._lock:
            self._process.stdin.write("bytes\n")
            return int(self._answer(30))

    def close(self) -> None:
        """Closing its stdin ends the proxy (so it also ends when this process dies)."""
        try:
            self._process.stdin.close()
            self._process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()


def _raise_priority() -> None:
    """A link needs no CPU: where permitted (root), the proxy runs before busy servers on a loaded
    machine, so a byte is not late because a core was taken."""
    try:
        os.nice(-10)
    except OSError:
        pass


async def _serve(target_port: int, delay: float, port: int) -> None:
    """Serves until stdin closes; answers each "bytes" line on stdin with the bytes forwarded so far."""
    proxy = DelayProxy(target_port, delay, port=port)
    print(await proxy.start(), flush=True)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "bytes":
                print(proxy.bytes_forwarded, flush=True)
    finally:
        await proxy.close()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m swarm.delay_proxy",
        description="Forward 127.0.0.1:PORT to 127.0.0.1:TARGET_PORT, delaying every byte by a fixed one-way time. "
                    "Prints the port it listens on; runs until its stdin closes.")
    parser.add_argument("--target-port", type=int, required=True, help="the local port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay of each direction, in ms")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    asyncio.run(_serve(args.target_port, args.delay_ms / 1000, args.port))


if __name__ == "__main__":
    main()
