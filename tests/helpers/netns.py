"""Network namespaces for tests that cross a network: NAT (a public network, and a home network behind
a router that masquerades outbound traffic and lets nothing in) and a LAN (hosts on one bridge).

    with NatTopology() as nat:
        nat.popen("public", [...])   # a process on the public network, at PUBLIC_IP
        nat.popen("home", [...])     # a process at home, at HOME_IP: it can dial out, nobody can dial in

    with LanTopology(["a", "b"]) as lan:
        lan.popen("a", [...])        # a process on host a, at lan.ips["a"]; multicast reaches b

Every address is the test's own, inside namespaces it creates and deletes: the namespaces have no
link to anything else, so nothing is routed outside them. The public network uses a public-looking
range because libp2p treats private ranges as unroutable (a libp2p relay ignores them). Needs root, `ip`
and `iptables`; `NatTopology.unavailable()` says why not where it cannot run.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

PUBLIC_IP = "11.0.0.1"
ROUTER_PUBLIC_IP = "11.0.0.2"
ROUTER_HOME_IP = "192.168.77.1"
HOME_IP = "192.168.77.2"
START_TIMEOUT = 240.0  # seconds a process may take to say it is up (slow days are slow)


class Namespaces:
    """Named network namespaces of this test's own, and processes in them; deleted on close."""

    namespaces: dict[str, str]

    def popen(self, where: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts `argv` in namespace `where`."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[where], *argv], **kwargs)

    def run(self, where: str, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[where], *argv], timeout=timeout, **kwargs)

    def _make(self, commands: list[list[str]]) -> None:
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True, text=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kills what still runs in the namespaces and deletes them (the veths go with them)."""
        for name in self.namespaces.values():
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def __exit__(self, *exc) -> None:
        self.close()


class LanTopology(Namespaces):
    """Hosts on one LAN: a namespace each, joined by a bridge in a namespace of its own (the switch),
    10.78.0.0/24, multicast allowed (mDNS works between them). Nothing links it to anything else."""

    def __init__(self, hosts: Sequence[str]) -> None:
        tag = secrets.token_hex(3)
        self.hosts = list(hosts)
        self.namespaces = {name: f"swarm-lan-{name}-{tag}" for name in [*self.hosts, "switch"]}
        self.ips = {name: f"10.78.0.{i + 1}" for i, name in enumerate(self.hosts)}
        self._tag = tag

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why the LAN cannot be built here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root (CI runs the tests as root)"
        if shutil.which("ip") is None:
            return "ip not installed (Debian package iproute2)"
        probe = f"swarm-probe-{secrets.token_hex(3)}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __enter__(self) -> "LanTopology":
        switch = self.namespaces["switch"]
        commands = [
            *(["ip", "netns", "add", ns] for ns in self.namespaces.values()),
            ["ip", "-n", switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"],
            ["ip", "-n", switch, "link", "set", "br0", "up"],
        ]
        for i, host in enumerate(self.hosts):
            ns, port, end = self.namespaces[host], f"swl{i}{self._tag}", f"swlh{i}{self._tag}"  # ≤ 15 characters
            commands += [
                ["ip", "link", "add", end, "type", "veth", "peer", "name", port],
                ["ip", "link", "set", end, "netns", ns],
                ["ip", "link", "set", port, "netns", switch],
                ["ip", "-n", switch, "link", "set", port, "master", "br0"],
                ["ip", "-n", switch, "link", "set", port, "up"],
                ["ip", "-n", ns, "addr", "add", f"{self.ips[host]}/24", "dev", end],
                ["ip", "-n", ns, "link", "set", end, "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", end],
            ]
        self._make(commands)
        return self


class NatTopology(Namespaces):
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.namespaces = {name: f"swarm-{name}-{tag}" for name in ("public", "router", "home")}
        self._veths = (f"swp{tag}", f"swrp{tag}", f"swh{tag}", f"swrh{tag}")  # at most 15 characters

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why the topology cannot be built here, or None."""
        if os.geteuid() != 0:
            return "network namespaces need root (CI runs the tests as root)"
        missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
        if missing:
            return (
                f"{' and '.join(missing)} not installed "
                "(Debian packages iproute2, iptables; scripts/test.sh installs them)"
            )
        probe = f"swarm-probe-{secrets.token_hex(3)}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        try:
            nat = subprocess.run(
                ["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L"], capture_output=True, text=True
            )
            if nat.returncode != 0:
                return f"iptables cannot set up NAT here: {nat.stderr.strip()}"
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None

    def __enter__(self) -> "NatTopology":
        public, router, home = (self.namespaces[name] for name in ("public", "router", "home"))
        pub_veth, router_pub_veth, home_veth, router_home_veth = self._veths
        commands = [
            *(["ip", "netns", "add", name] for name in (public, router, home)),
            ["ip", "link", "add", pub_veth, "type", "veth", "peer", "name", router_pub_veth],
            ["ip", "link", "add", home_veth, "type", "veth", "peer", "name", router_home_veth],
            ["ip", "link", "set", pub_veth, "netns", public],
            ["ip", "link", "set", router_pub_veth, "netns", router],
            ["ip", "link", "set", home_veth, "netns", home],
            ["ip", "link", "set", router_home_veth, "netns", router],
            ["ip", "-n", public, "addr", "add", f"{PUBLIC_IP}/24", "dev", pub_veth],
            ["ip", "-n", router, "addr", "add", f"{ROUTER_PUBLIC_IP}/24", "dev", router_pub_veth],
            ["ip", "-n", router, "addr", "add", f"{ROUTER_HOME_IP}/24", "dev", router_home_veth],
            ["ip", "-n", home, "addr", "add", f"{HOME_IP}/24", "dev", home_veth],
            *(["ip", "-n", ns, "link", "set", "lo", "up"] for ns in (public, router, home)),
            ["ip", "-n", public, "link", "set", pub_veth, "up"],
            ["ip", "-n", router, "link", "set", router_pub_veth, "up"],
            ["ip", "-n", router, "link", "set", router_home_veth, "up"],
            ["ip", "-n", home, "link", "set", home_veth, "up"],
            ["ip", "-n", home, "route", "add", "default", "via", ROUTER_HOME_IP],
            ["ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            [
                "ip",
                "netns",
                "exec",
                router,
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                router_pub_veth,
                "-j",
                "MASQUERADE",
            ],
            [
                "ip",
                "netns",
                "exec",
                router,
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                router_pub_veth,
                "-o",
                router_home_veth,
                "-m",
                "state",
                "--state",
                "ESTABLISHED,RELATED",
                "-j",
                "ACCEPT",
            ],
            [
                "ip",
                "netns",
                "exec",
                router,
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                router_pub_veth,
                "-o",
                router_home_veth,
                "-j",
                "DROP",
            ],
        ]
        self._make(commands)
        return self


class Process:
    """A process in one namespace, in its own process group (killing it kills its daemons too), with
    stdout read line by line and stderr in a log file."""

    def __init__(self, nat: Namespaces, where: str, argv: list[str], log: Path, stdin: bool = False):
        self.log = log
        self.handle = nat.popen(
            where,
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def line(self, accept, timeout: float = START_TIMEOUT) -> str:
        """The first stdout line that `accept` takes (bounded: the process must not go quiet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.handle.stdout.readline()
            if not line:
                raise AssertionError(
                    f"{self.log.name}: exited ({self.handle.poll()}); log:\n{self.log.read_text()[-3000:]}"
                )
            if accept(line.strip()):
                return line.strip()
        raise AssertionError(f"{self.log.name}: no expected line in {timeout:.0f} s")

    def json(self, key: str):
        return json.loads(self.line(lambda line: line.startswith("{") and f'"{key}"' in line))[key]

    def send(self, text: str) -> None:
        self.handle.stdin.write(text + "\n")
        self.handle.stdin.flush()

    def kill(self, sig: int = signal.SIGKILL, wait: bool = True) -> None:
        """Signals the whole process group (SIGKILL: the machine is gone; SIGTERM: a clean stop)."""
        try:
            os.killpg(self.handle.pid, sig)
        except ProcessLookupError:
            pass
        if wait:
            self.handle.wait(timeout=30)


def start_bootstrap(nat: NatTopology, tmp_path: Path, name: str, port: int, peers: list[str]) -> tuple[Process, str]:
    """A bootstrap node on the public network; returns it and its multiaddr."""
    argv = ["-m", "bootstrap", "--host", PUBLIC_IP, "--port", str(port), "--identity", str(tmp_path / f"{name}.key")]
    if peers:
        argv += ["--initial-peers", *peers]
    process = Process(nat, "public", argv, tmp_path / f"{name}.log")
    return process, process.line(lambda line: line.startswith("/ip4/"))


def start_server(
    nat: NatTopology,
    tmp_path: Path,
    name: str,
    where: str,
    host: str,
    model: Path,
    blocks: str,
    peers: list[str],
    *extra: str,
) -> tuple[Process, str]:
    """A `swarm.serve` process (default flags but a fixed throughput); returns it and its peer id."""
    process = Process(
        nat,
        where,
        [
            "-m",
            "swarm.serve",
            "--model",
            str(model),
            "--blocks",
            blocks,
            "--host",
            host,
            "--throughput",
            "100",
            "--initial-peers",
            *peers,
            *extra,
        ],
        tmp_path / f"{name}.log",
    )
    online = process.line(lambda line: line.startswith("swarm.serve online:"))
    return process, online.split(" peer ")[1].split(",")[0]
