"""Child processes of a local swarm: each tracked by pid, its stdout read by a thread, its stderr in a
log file, stopped on exit. Children are forked from one preloaded parent (`harness.forker`) so that
each starts without paying for the imports of torch and hivemind again; they are still separate
processes, killed and stopped like any other.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional, Sequence

logger = logging.getLogger(__name__)


class ProcessFailed(RuntimeError):
    """A child process exited or did not report readiness in time."""


class ForkedProcess:
    """The part of `subprocess.Popen` that `Child` uses, for a process forked by a `Forker`."""

    def __init__(self, forker: "Forker", pid: int, stdout: IO[str]):
        self.forker, self.pid, self.stdout = forker, pid, stdout

    @property
    def returncode(self) -> Optional[int]:
        return self.forker.exit_codes.get(self.pid)

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if not self.forker.alive():
                raise ProcessFailed(f"the forker of process {self.pid} died; its exit code is unknown")
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Forker:
    """One `python -m harness.forker` process, preloaded with torch and hivemind, that forks children on request."""

    def __init__(self, env: Optional[dict] = None, preload: Sequence[str] = ()):
        """`preload`: modules to import once for all children (default: those of servers and bootstrap nodes)."""
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.forker", str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        theirs.close()
        self.sock = ours
        self.exit_codes: dict[int, int] = {}
        self._replies: "queue.Queue[dict]" = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.sock.makefile("r", encoding="utf-8"):
            message = json.loads(line)
            if "exit" in message:
                self.exit_codes[message["exit"]] = message["code"]
            else:
                self._replies.put(message)
        self._replies.put({"error": "the forker exited"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(self, module: str, args: Sequence[str], stderr: IO, env: dict, timeout: float = 120.0) -> ForkedProcess:
        """Forks `python -m module args…` with `env`, stdin from /dev/null, stderr to `stderr`, stdout to a pipe."""
        read_end, write_end = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        request = {"module": module, "args": list(args), "env": env, "cwd": os.getcwd()}
        try:
            with self._lock:
                socket.send_fds(self.sock, [json.dumps(request).encode()], [devnull, write_end, stderr.fileno()])
                try:
                    reply = self._replies.get(timeout=timeout)
                except queue.Empty:
                    raise ProcessFailed(f"the forker did not start {module} in {timeout:.0f} s") from None
        except OSError as e:
            os.close(read_end)
            raise ProcessFailed(f"the forker is gone: {e}") from e
        finally:
            os.close(write_end)
            os.close(devnull)
        if "pid" not in reply:
            os.close(read_end)
            raise ProcessFailed(f"the forker could not start {module}: {reply.get('error')}")
        return ForkedProcess(self, reply["pid"], os.fdopen(read_end, "r", encoding="utf-8", errors="replace"))

    def close(self) -> None:
        """Ends the forker; children still running are killed with it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # the reader's file object keeps the socket open past close()
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_shared: dict[tuple[str, ...], Forker] = {}
_shared_lock = threading.Lock()


def shared_forker(preload: Sequence[str] = ()) -> Forker:
    """This process's forker preloaded with `preload` (default: what servers and bootstrap nodes import),
    started on first use (and again if it died), closed at exit."""
    key = tuple(preload)
    with _shared_lock:
        forker = _shared.get(key)
        if forker is None or not forker.alive():
            forker = _shared[key] = Forker(child_env({}), preload=key)
            atexit.register(forker.close)
        return forker


class Child:
    """A subprocess whose stdout lines are collected by a thread, so reading never blocks forever.

    With a `forker`, `args` must be `[python, "-m", module, …]` and the process is forked from it.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        env: Optional[dict] = None,
        forker: Optional[Forker] = None,
    ):
        self.name = name
        self.peer_id: Optional[str] = None
        self.metrics_url: Optional[str] = None  # the server's Prometheus endpoint, once online
        self.log_path = log_path
        self._log = open(log_path, "wb")
        if forker is not None:
            if list(args[1:2]) != ["-m"]:
                raise ValueError("a forked child runs a module: args must be [python, '-m', module, ...]")
            self.proc = forker.spawn(args[2], args[3:], self._log, env if env is not None else dict(os.environ))
        else:
            self.proc = subprocess.Popen(
                list(args),
                stdout=subprocess.PIPE,
                stderr=self._log,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
                start_new_session=True,  # its own process group: kill() takes its DHT child and p2pd daemon too
            )
        self._asked_to_stop = False
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
                raise ProcessFailed(
                    f"{self.name} exited with {self.proc.wait()}; see {self.log_path}:\n{self.log_tail()}"
                )
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

    def ask_to_stop(self) -> None:
        """SIGCONT and one SIGTERM, once: a second SIGTERM would make a server skip its drain."""
        if self.proc.poll() is None and not self._asked_to_stop:
            self._asked_to_stop = True
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, then SIGKILL to its process group if it has not exited in `timeout` seconds."""
        if self.proc.poll() is None:
            self.ask_to_stop()
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


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # several processes share few cores; oversubscription only slows them
    # Idle OpenMP threads otherwise spin for a while after each step, stealing the cores that the
    # next server in the chain needs (measured: 0.81 → 0.92 of single-process speed on 2 cores).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # …but a thread that sleeps at once after each parallel product must be woken for the next one,
    # dozens of times a step: GNU OpenMP's spin of 10 000 (about 0.1 ms) keeps them awake within a step
    # and lets them sleep between steps (a 16-session round of four layers: 35 ms against 60 ms).
    env.setdefault("GOMP_SPINCOUNT", "10000")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env
