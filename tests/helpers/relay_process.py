"""A real `python -m relay` subprocess on 127.0.0.1 for tests, and small HTTP helpers to talk to it."""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Sequence

from harness.processes import Child, child_env, shared_forker

# One parent preloaded with the relay's imports forks every relay process of the test session.
RELAY_PRELOAD = ("torch", "hivemind", "relay.app", "relay.__main__")

READY = re.compile(
    r"relay ready: management http://([\d.]+):(\d+)/, observability http://[\d.]+:(\d+)/metrics, "
    r"api http://[\d.]+:(\d+)/v1"
)


class RelayProcess:
    def __init__(self, workdir: Path, args: Sequence[str], name: str = "relay", api_port: int = 0):
        """`api_port`: fix it when servers must find the relay again after a restart."""
        self.workdir = workdir
        self.args = list(args)
        self.api_port = api_port
        self.name = name
        self.child: Optional[Child] = None
        self.mgmt = self.obs = self.api = ""
        self.starts = 0

    def start(self, timeout: float = 120.0) -> "RelayProcess":
        self.starts += 1
        self.child = Child(
            self.name,
            [
                sys.executable,
                "-m",
                "relay",
                "--host",
                "127.0.0.1",
                "--mgmt-port",
                "0",
                "--obs-port",
                "0",
                "--api-port",
                str(self.api_port),
                *self.args,
            ],
            self.workdir / f"{self.name}-{self.starts}.log",
            env=child_env({}),
            forker=shared_forker(RELAY_PRELOAD),
        )
        match = READY.match(self.child.wait_for_line(lambda line: line.startswith("relay ready:"), timeout))
        host, mgmt, obs, api = match.groups()
        self.mgmt, self.obs, self.api = (f"http://{host}:{port}" for port in (mgmt, obs, api))
        return self

    def stop(self) -> Optional[int]:
        return self.child.stop() if self.child is not None else None


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: Optional[dict[str, str]] = None,
    raw: Optional[bytes] = None,
    timeout: float = 60.0,
) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one request; error statuses are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, response_headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, payload, response_headers = e.code, e.read(), dict(e.headers)
    text = payload.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None, response_headers
    except json.JSONDecodeError:
        return status, text, response_headers


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout:.0f} s")
        time.sleep(interval)


def signed_registration(
    name: str,
    relay: str,
    model: str = "m",
    signed_at: Optional[int] = None,
    identity: Optional[Path] = None,
    **extra: Any,
) -> dict[str, Any]:
    """A registration body for the relay at URL `relay`, by the peer whose key is in `identity` (default:
    a new one), signed as `swarm.serve` signs it."""
    from dht.identity import ensure_identity, make_validator, peer_id_of_subkey
    from protocol.registration import sign_registration

    if identity is None:  # a throwaway key: gone once it has signed
        with tempfile.TemporaryDirectory(prefix="swarm-test-peer-") as folder:
            return signed_registration(name, relay, model, signed_at, Path(folder) / "identity.key", **extra)
    validator = make_validator(ensure_identity(identity))
    peer_id = peer_id_of_subkey(validator.local_public_key)
    signed_at = int(time.time()) if signed_at is None else signed_at
    return sign_registration(
        validator, relay, {"name": name, "peer_id": peer_id, "signed_at": signed_at, "model": model, **extra}
    )
