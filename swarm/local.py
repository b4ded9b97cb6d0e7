"""A local swarm of real processes on 127.0.0.1: one bootstrap node and block servers.

Used by the demo, the tests and the benches. Every child is tracked by pid and stopped on exit;
each process's stderr goes to a log file in `workdir`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

ONLINE_MARKER = "swarm.serve online:"


def even_splits(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous block ranges of near-equal size covering [0, num_blocks)."""
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


class ProcessFailed(RuntimeError):
    """A child process exited or did not report readiness in time."""


class Child:
    """A subprocess whose stdout lines are collected by a thread, so reading never blocks forever."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: Optional[dict] = None):
        self.name = name
        self.peer_id: Optional[str] = None
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, env=env, text=True,
            start_new_session=True,  # its own process group: kill() takes its DHT child and p2pd daemon too
        )
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for_line(self, predicate, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessFailed(f"{self.name} did not get ready in {timeout:.0f} s; see {self.log_path}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise ProcessFailed(f"{self.name} exited with {self.proc.wait()}; see {self.log_path}:\n{self.log_tail()}")
            if predicate(line):
                return line

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL to its process group if it has not exited in `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class LocalSwarm:
    """`with LocalSwarm(model, [(0, 2), (2, 4)]) as swarm: swarm.initial_peers` ..."""

    def __init__(
        self,
        model: str | Path,
        splits: Sequence[tuple[int, int]],
        *,
        server_args: Sequence[str] = (),
        workdir: Optional[str | Path] = None,
        start_timeout: float = 180.0,
        env: Optional[dict[str, str]] = None,
    ):
        self.model = str(model)
        self.splits = list(splits)
        self.server_args = list(server_args)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="swarm-local-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.env = _child_env(env or {})
        self.bootstrap: Optional[Child] = None
        self.servers: list[Child] = []
        self.initial_peers: list[str] = []

    def start(self) -> "LocalSwarm":
        try:
            self.bootstrap = Child(
                "bootstrap",
                [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0",
                 "--identity", str(self.workdir / "bootstrap.key"), "--log-level", "warning"],
                self.workdir / "bootstrap.log",
                env=self.env,
            )
            self.initial_peers = [self.bootstrap.wait_for_line(lambda line: "/p2p/" in line, self.start_timeout)]
            for start, end in self.splits:
                self.add_server(start, end, wait=False)
            for server in self.servers:
                self.wait_online(server)
        except BaseException:
            self.stop()
            raise
        return self

    def add_server(
        self, start: Optional[int], end: Optional[int], *extra: str, wait: bool = True, module: str = "swarm.serve",
        env: Optional[dict[str, str]] = None,
    ) -> Child:
        """Starts one more server for blocks [start, end) (None: the server chooses); `module` runs it,
        so a wrapper of swarm.serve may inject faults in tests."""
        index = len(self.servers)
        blocks = ["--blocks", f"{start}:{end}"] if start is not None else []
        child = Child(
            f"server {index} ({start}:{end})" if blocks else f"server {index} (auto)",
            [sys.executable, "-m", module, "--model", self.model, *blocks,
             "--initial-peers", *self.initial_peers, "--host", "127.0.0.1", "--port", "0",
             "--identity", str(self.workdir / f"server{index}.key"), *self.server_args, *extra],
            self.workdir / f"server{index}.log",
            env={**self.env, **(env or {})},
        )
        self.servers.append(child)
        if wait:
            self.wait_online(child)
        return child

    def wait_online(self, child: Child) -> None:
        """Blocks until `child` reports it is online, and learns its peer id."""
        line = child.wait_for_line(lambda line: line.startswith(ONLINE_MARKER), self.start_timeout)
        child.peer_id = line.split(" peer ", 1)[1].split(",", 1)[0]

    def server(self, peer_id: str) -> Child:
        """The server process with this peer id."""
        return next(child for child in self.servers if child.peer_id == peer_id)

    def stop(self) -> None:
        for child in self.servers + ([self.bootstrap] if self.bootstrap else []):
            child.stop()

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _child_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share few cores; oversubscription only slows them
    # Idle OpenMP threads otherwise spin for a while after each step, stealing the cores that the
    # next server in the chain needs (measured: 0.81 → 0.92 of single-process speed on 2 cores).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env
