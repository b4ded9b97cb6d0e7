"""A real `redis-server` (Debian's package) on 127.0.0.1 for the KV tier's tests: started on a free
port with nothing saved to disk, stopped on exit."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

from dht.ports import free_port


class RedisServer:
    """`with RedisServer() as redis: redis.url` ..."""

    @staticmethod
    def unavailable() -> Optional[str]:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (Debian package redis-server; scripts/test.sh installs it)"
        return None

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="swarm-redis-")
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.__exit__()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)
