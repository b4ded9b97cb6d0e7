"""A TCP proxy that delays every byte by a fixed one-way time: a local swarm that behaves like one on a WAN.

This kernel has no `netem`; a proxy in front of each local server, announced through
`--announce-maddrs`, makes every connection to that server cross a link of `delay` seconds each
way. Data keeps its order and is never dropped; bandwidth is not limited. Loopback only.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024


class DelayProxy:
    """Listens on `host:port` (0: a free port) and forwards each connection to `target_port` on the same host.

    Threads, not an event loop: each direction of a connection has a reader that stamps every chunk
    with its due time and a writer that sleeps until then with the clock's precision (an event
    loop's timers wake up to a millisecond late, and a link that adds a millisecond per message
    is not the link being measured)."""

    def __init__(self, target_port: int, delay: float, host: str = "127.0.0.1", port: int = 0):
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.host, self.target_port, self.delay = host, target_port, delay
        self.port = port
        self._forwarded = 0
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self._sockets: set[socket.socket] = set()
        self._closed = False

    @property
    def bytes_forwarded(self) -> int:
        with self._lock:
            return self._forwarded

    def start(self) -> int:
        self._listener = socket.create_server((self.host, self.port))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="delay-proxy-accept", daemon=True).start()
        return self.port

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets = list(self._sockets)
        if self._listener is not None:
            _shut(self._listener)
        for sock in sockets:
            _shut(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                target = socket.create_connection((self.host, self.target_port))
            except OSError as e:
                logger.debug("delay proxy: target port %d refused: %s", self.target_port, e)
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    target.close()
                    return
                self._sockets.update((client, target))
            for sock in (client, target):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ends = threading.Barrier(2, action=lambda: self._drop(client, target))
            for source, sink in ((client, target), (target, client)):
                _Direction(self, source, sink, ends).start()

    def _drop(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            _shut(sock)

    def _count(self, size: int) -> None:
        with self._lock:
            self._forwarded += size


class _Direction:
    """One direction of one connection: every chunk read from `source` is written to `sink` `delay`
    after it was read, in order; the end of the stream travels too. A broken direction closes both."""

    def __init__(self, proxy: DelayProxy, source: socket.socket, sink: socket.socket, ends: threading.Barrier):
        self.proxy, self.source, self.sink, self.ends = proxy, source, sink, ends
        self._queue: collections.deque = collections.deque()
        self._ready = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, name="delay-proxy-read", daemon=True).start()
        threading.Thread(target=self._write, name="delay-proxy-write", daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.source.recv(_CHUNK):
                self._put(data)
        except OSError:
            data = None  # broken: the writer closes the connection instead of ending it
        self._put(data)

    def _put(self, data: Optional[bytes]) -> None:
        with self._ready:
            self._queue.append((time.monotonic() + self.proxy.delay, data))
            self._ready.notify()

    def _write(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._queue:
                        self._ready.wait()
                    due, data = self._queue.popleft()
                while (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                if data is None:
                    self.proxy._drop(self.source, self.sink)
                    break
                if not data:
                    self.sink.shutdown(socket.SHUT_WR)
                    break
                self.sink.sendall(data)
                self.proxy._count(len(data))
        except OSError:
            self.proxy._drop(self.source, self.sink)
        try:
            self.ends.wait()  # both directions ended: the connection is done
        except threading.BrokenBarrierError:
            pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


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
            [
                sys.executable,
                "-m",
                "harness.delay_proxy",
                "--target-port",
                str(target_port),
                "--delay-ms",
                repr(delay * 1000),
                "--port",
                str(port),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            preexec_fn=_raise_priority,
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
            raise RuntimeError(
                f"delay proxy for port {self.target_port} did not answer (exit code {self._process.poll()})"
            )
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


def _serve(target_port: int, delay: float, port: int) -> None:
    """Serves until stdin closes; answers each "bytes" line on stdin with the bytes forwarded so far."""
    _tight_timers()
    proxy = DelayProxy(target_port, delay, port=port)
    print(proxy.start(), flush=True)
    try:
        while line := sys.stdin.readline():
            if line.strip() == "bytes":
                print(proxy.bytes_forwarded, flush=True)
    finally:
        proxy.close()


def _tight_timers() -> None:
    """Linux lets a sleeping thread wake up to 50 µs late by default (timer slack); a link should not."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.delay_proxy",
        description="Forward 127.0.0.1:PORT to 127.0.0.1:TARGET_PORT, delaying every byte by a fixed one-way time. "
        "Prints the port it listens on; runs until its stdin closes.",
    )
    parser.add_argument("--target-port", type=int, required=True, help="the local port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay of each direction, in ms")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    _serve(args.target_port, args.delay_ms / 1000, args.port)


if __name__ == "__main__":
    main()
