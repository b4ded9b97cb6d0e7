"""Finding swarm peers on the LAN with libp2p mDNS, for `--mdns` (off unless asked: it multicasts).

py-libp2p does the mDNS (`discovery/mdns_peer.py`), in a process of its own and under the Python of
its own environment: it cannot share a process with hivemind (their protobuf descriptors collide)
nor an environment (it needs protobuf < 7). This side starts that process, tells it what to
announce, and reads what it finds. Every line it relays came from a stranger on the LAN: only a
well-formed peer id with well-formed TCP addresses is kept, a bounded number of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

PYTHON_ENV = "SWARM_LAN_PYTHON"
DEFAULT_PYTHON = Path(__file__).resolve().parents[1] / ".venv-lan" / "bin" / "python"
PEER_SCRIPT = Path(__file__).with_name("mdns_peer.py")
START_TIMEOUT = 60.0  # seconds the discovery process may take to import py-libp2p on a slow day
MAX_PEERS = 256
MAX_ADDRS = 8
MAX_LINE = 16 * 1024

_PEER_ID = re.compile(r"^(Qm[1-9A-HJ-NP-Za-km-z]{44}|12D3Koo[1-9A-HJ-NP-Za-km-z]{45,46})$")
_TCP_ADDR = re.compile(r"^/(ip4/\d{1,3}(\.\d{1,3}){3}|ip6/[0-9a-fA-F:]{2,39})/tcp/\d{1,5}$")


class MdnsUnavailable(RuntimeError):
    """LAN discovery cannot run here (no py-libp2p environment): the message says how to get one."""


def lan_python() -> Path:
    """The Python of the environment that holds py-libp2p (`SWARM_LAN_PYTHON`, else the checkout's
    `.venv-lan`, which scripts/install.sh makes)."""
    python = Path(os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON)
    if not python.exists():
        raise MdnsUnavailable(
            f"--mdns needs py-libp2p in an environment of its own, and {python} does not exist: run "
            f"scripts/install.sh (it makes .venv-lan), or set {PYTHON_ENV} to the python of an environment "
            "with `pip install libp2p==0.8.1`"
        )
    return python


def parse_found(line: str) -> Optional[tuple[str, list[str]]]:
    """(peer id, its multiaddrs ending in /p2p/<peer id>) from one line of the discovery process, or
    None when the line is anything else or malformed."""
    if len(line) > MAX_LINE:
        return None
    try:
        found = json.loads(line)
        peer_id, addrs = found["peer_id"], found["addrs"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(peer_id, str) or not _PEER_ID.match(peer_id) or not isinstance(addrs, list):
        return None
    kept = [a for a in addrs[:MAX_ADDRS] if isinstance(a, str) and _TCP_ADDR.match(a) and _port_ok(a)]
    return (peer_id, [f"{a}/p2p/{peer_id}" for a in kept]) if kept else None


def _port_ok(addr: str) -> bool:
    return 0 < int(addr.rsplit("/", 1)[1]) < 65536


def lan_addrs(maddrs: Sequence[str]) -> list[str]:
    """What of a node's multiaddrs is worth announcing on a LAN: not loopback, not wildcards."""
    return [
        a
        for a in maddrs
        if not a.startswith(("/ip4/127.", "/ip6/::1/", "/ip4/0.0.0.0/", "/ip6/::/")) and "/p2p-circuit" not in a
    ]


class LanDiscovery:
    """A running py-libp2p mDNS browser (and, after `advertise`, responder).

    with LanDiscovery() as lan:
        peers = lan.wait_for_peers(5.0)   # multiaddrs of the peers found
        lan.advertise(my_maddrs)          # others on the LAN find this node too
    """

    def __init__(self, exclude: Sequence[str] = ()):
        """`exclude`: peer ids not to report (this node's own)."""
        python = lan_python()
        self.peers: dict[str, list[str]] = {}
        self.exclude = set(exclude)
        self._changed = threading.Condition()
        self._ready = threading.Event()
        self._closed = False
        self._ready_seen = False
        self._process = subprocess.Popen(
            [str(python), str(PEER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        )
        self._errors: deque[str] = deque(maxlen=20)  # its stderr's last lines (read on, so it never blocks)
        threading.Thread(target=self._read, name="mdns-reader", daemon=True).start()
        self._error_reader = threading.Thread(target=self._read_errors, name="mdns-errors", daemon=True)
        self._error_reader.start()
        if not self._ready.wait(START_TIMEOUT) or not self._ready_seen:
            error = self._stop_and_read_error()
            raise MdnsUnavailable(f"LAN discovery (py-libp2p mDNS) did not start: {error or 'no answer'}")
        logger.info("mDNS: browsing the LAN for swarm peers (_p2p._udp.local)")

    def _read(self) -> None:
        try:
            self._read_lines()
        finally:
            self._ready.set()  # the process ended: nobody waits for a ready line that never comes

    def _read_lines(self) -> None:
        for line in self._process.stdout:
            if line.startswith('{"ready"'):
                self._ready_seen = True
                self._ready.set()
                continue
            found = parse_found(line.strip())
            if found is None:
                logger.debug("mDNS: ignored a malformed announcement")
                continue
            peer_id, addrs = found
            with self._changed:
                if peer_id in self.exclude or (peer_id not in self.peers and len(self.peers) >= MAX_PEERS):
                    continue
                if self.peers.get(peer_id) != addrs:
                    self.peers[peer_id] = addrs
                    logger.info("mDNS: found peer %s at %s", peer_id, ", ".join(addrs))
                    self._changed.notify_all()

    def _read_errors(self) -> None:
        for line in self._process.stderr:
            self._errors.append(line.rstrip()[:500])
            logger.debug("mDNS process: %s", line.rstrip()[:500])

    def found(self) -> list[str]:
        """Every multiaddr found so far."""
        return [addr for addrs in self.snapshot().values() for addr in addrs]

    def snapshot(self) -> dict[str, list[str]]:
        """The peers found so far: {peer id: its multiaddrs}."""
        with self._changed:
            return {peer_id: list(addrs) for peer_id, addrs in self.peers.items()}

    def wait_for_peers(self, timeout: float, settle: float = 0.5) -> list[str]:
        """The multiaddrs found within `timeout` seconds ([] if none), waiting `settle` seconds more
        after the first find for other peers' answers."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(lambda: bool(self.peers), timeout)
            if self.peers:
                self._changed.wait(max(0.0, min(settle, deadline - time.monotonic())))
        return self.found()

    def wait_for_change(self, timeout: float) -> None:
        """Returns when a peer is found or changes address, at close, or after `timeout` seconds."""
        with self._changed:
            if not self._closed:
                self._changed.wait(timeout)

    def advertise(self, maddrs: Sequence[str]) -> None:
        """Announces this node's multiaddrs (all with its /p2p/ id) on the LAN."""
        try:
            self._process.stdin.write(json.dumps({"advertise": list(maddrs)}) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            logger.warning("mDNS: could not announce this node (the discovery process is gone: %s)", e)
            return
        logger.info("mDNS: announcing %s on the LAN", ", ".join(maddrs))

    def _stop_and_read_error(self) -> str:
        self.close()
        self._error_reader.join(2.0)  # to the end of its stderr
        return self._errors[-1] if self._errors else ""

    def close(self) -> None:
        """Withdraws what was announced (closing its stdin tells the process) and ends the process."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._process.poll() is None:
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "LanDiscovery":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
