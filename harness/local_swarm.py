"""A local swarm of real processes on 127.0.0.1: one bootstrap node and block servers.

Used by the demo, the tests and the benches. Every child is a separate process (`harness.processes`),
forked from a preloaded parent unless asked otherwise, and stopped on exit; each process's stderr
goes to a log file in `workdir`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from dht.ports import free_port
from harness.delay_proxy import DelayProxyProcess
from harness.processes import Child, Forker, child_env, shared_forker

logger = logging.getLogger(__name__)

ONLINE_MARKER = "swarm.serve online:"


def even_splits(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous block ranges of near-equal size covering [0, num_blocks)."""
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


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
        fork: bool = True,
        link_delay_ms: float = 0.0,
    ):
        """`fork=False` starts every child with a fresh interpreter (slower: each imports torch and hivemind).
        `link_delay_ms` puts a `DelayProxy` in front of every server, announced with `--announce-maddrs`,
        so that every connection to a server crosses a link of that one-way delay."""
        self.model = str(model)
        self.splits = list(splits)
        self.server_args = list(server_args)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="swarm-local-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.env = child_env(env or {})
        self.fork = fork
        self.link_delay_ms = link_delay_ms
        self.proxies: list[DelayProxyProcess] = []
        self.bootstrap: Optional[Child] = None
        self.servers: list[Child] = []
        self.initial_peers: list[str] = []

    def start(self) -> "LocalSwarm":
        try:
            self.bootstrap = Child(
                "bootstrap",
                [
                    sys.executable,
                    "-m",
                    "bootstrap",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--identity",
                    str(self.workdir / "bootstrap.key"),
                    "--log-level",
                    "warning",
                ],
                self.workdir / "bootstrap.log",
                env=self.env,
                forker=self._forker(),
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
        self,
        start: Optional[int],
        end: Optional[int],
        *extra: str,
        wait: bool = True,
        module: str = "swarm.serve",
        env: Optional[dict[str, str]] = None,
    ) -> Child:
        """Starts one more server for blocks [start, end) (None: the server chooses); `module` runs it,
        so a wrapper of swarm.serve may inject faults in tests."""
        index = len(self.servers)
        blocks = ["--blocks", f"{start}:{end}"] if start is not None else []
        listen = ["--port", "0"]
        if self.link_delay_ms > 0:
            port = free_port()
            proxy = DelayProxyProcess(port, self.link_delay_ms / 1000)
            self.proxies.append(proxy)
            listen = ["--port", str(port), "--announce-maddrs", f"/ip4/127.0.0.1/tcp/{proxy.port}"]
        child = Child(
            f"server {index} ({start}:{end})" if blocks else f"server {index} (auto)",
            [
                sys.executable,
                "-m",
                module,
                "--model",
                self.model,
                *blocks,
                "--initial-peers",
                *self.initial_peers,
                "--host",
                "127.0.0.1",
                *listen,
                "--identity",
                str(self.workdir / f"server{index}.key"),
                *self.server_args,
                *extra,
            ],
            self.workdir / f"server{index}.log",
            env={**self.env, **(env or {})},
            forker=self._forker(),
        )
        self.servers.append(child)
        if wait:
            self.wait_online(child)
        return child

    def _forker(self) -> Optional[Forker]:
        return shared_forker() if self.fork else None

    def wait_online(self, child: Child) -> None:
        """Blocks until `child` reports it is online, and learns its peer id."""
        line = child.wait_for_line(lambda line: line.startswith(ONLINE_MARKER), self.start_timeout)
        child.peer_id = line.split(" peer ", 1)[1].split(",", 1)[0]
        child.metrics_url = line.rsplit(" metrics ", 1)[1].strip()

    def server(self, peer_id: str) -> Child:
        """The server process with this peer id."""
        return next(child for child in self.servers if child.peer_id == peer_id)

    def stop(self) -> None:
        """Stops every child: all are asked at once (each drains and says goodbye), then waited for."""
        children = self.servers + ([self.bootstrap] if self.bootstrap else [])
        for child in children:
            child.ask_to_stop()
        for child in children:
            child.stop()
        for proxy in self.proxies:
            proxy.close()
        self.proxies.clear()

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def print_log_tails(self, lines: int = 25) -> None:
        """The last lines of every child's log, on stdout: what each process was doing when the
        caller failed (a test's report shows them; the files go with the temporary directory)."""
        for child in ([self.bootstrap] if self.bootstrap else []) + self.servers:
            tail = "\n".join(line[:300] for line in child.log_tail(lines).splitlines())
            print(f"--- {child.name} {child.peer_id or ''}, {child.log_path}:\n{tail}", flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.print_log_tails()
        self.stop()
