"""A server's optional link to a relay: register, heartbeat with hardware status and load, apply the
load-control config the relay pushes, rotate tokens before they expire.

The relay is optional: when it is unreachable or refuses, the server logs it, keeps serving the swarm,
and tries again later. Credentials are kept in a 0600 file so a restarted server keeps its worker id
(and its reliability history).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import aiohttp

from protocol.worker_auth import needs_refresh, signature_headers

logger = logging.getLogger(__name__)


class RelayRefused(Exception):
    """The relay answered with an error status; `status` says which."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class Credentials:
    worker_id: int
    token: str
    refresh_token: str
    signing_secret: str
    token_expires_at: float


class RelayLink:
    def __init__(
        self,
        url: str,
        credentials_path: Path,
        registration: Callable[[str], Awaitable[dict[str, Any]]],
        heartbeat: Callable[[], Awaitable[dict[str, Any]]],
        apply_config: Callable[[dict[str, Any]], Awaitable[None]],
        period: float = 30.0,
        join_token: Optional[str] = None,
        clock: Callable[[], float] = time.time,
    ):
        """`registration(url)` makes the signed registration body for the relay at `url`; `clock` decides
        when tokens need refreshing (requests are always stamped with the real time)."""
        self.url = url.rstrip("/")
        self.credentials_path = credentials_path
        self.registration = registration
        self.heartbeat_body = heartbeat
        self.apply_config = apply_config
        self.period = period
        self.join_token = join_token
        self.clock = clock
        self.credentials = self._load_credentials()
        self.config_version = 0
        self.last_error: Optional[str] = None
        self.last_beat: Optional[float] = None  # when the relay last acknowledged a heartbeat
        self._session: Optional[aiohttp.ClientSession] = None

    # ---- credentials -------------------------------------------------------------------------

    def _load_credentials(self) -> Optional[Credentials]:
        try:
            return Credentials(**json.loads(self.credentials_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save_credentials(self) -> None:
        self.credentials_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.credentials_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.credentials.__dict__, f)
        tmp.replace(self.credentials_path)

    def _take(self, reply: dict[str, Any]) -> None:
        expires = dt.datetime.fromisoformat(reply["token_expires_at"].replace("Z", "+00:00")).timestamp()
        signing = reply.get("signing_secret") or self.credentials.signing_secret
        self.credentials = Credentials(
            int(reply["worker_id"]), reply["token"], reply["refresh_token"], signing, expires
        )
        self._save_credentials()

    # ---- requests ----------------------------------------------------------------------------

    async def _request(
        self, method: str, path: str, body: Optional[dict] = None, signed: bool = True
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"}
        if signed:
            creds = self.credentials
            headers.update(signature_headers(creds.signing_secret, method, path, data, time.time()))
            headers["Authorization"] = f"Bearer {creds.token}"
        elif self.join_token:
            headers["X-Join-Token"] = self.join_token
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self._session.request(method, self.url + path, data=data or None, headers=headers) as response:
            try:
                reply = await response.json(content_type=None)
            except ValueError:
                reply = {}
            if response.status >= 400:
                message = (
                    reply.get("error", {}).get("message", response.reason)
                    if isinstance(reply, dict)
                    else response.reason
                )
                raise RelayRefused(response.status, str(message))
            return reply

    async def register(self) -> None:
        reply = await self._request("POST", "/api/v1/workers/register", await self.registration(self.url), signed=False)
        self._take(reply)
        self.config_version = 0
        logger.info("registered with the relay %s as worker %d", self.url, self.credentials.worker_id)

    async def refresh_tokens(self) -> None:
        creds = self.credentials
        reply = await self._request(
            "POST", f"/api/v1/workers/{creds.worker_id}/refresh", {"refresh_token": creds.refresh_token}
        )
        self._take(reply)
        logger.info("relay tokens rotated (worker %d)", creds.worker_id)

    async def beat(self, status: str = "online") -> dict[str, Any]:
        """One heartbeat (registering first if needed); applies a changed config."""
        if self.credentials is None:
            await self.register()
        elif needs_refresh(self.credentials.token_expires_at, self.clock()):
            await self.refresh_tokens()
        body = {**await self.heartbeat_body(), "status": status, "config_version": self.config_version}
        path = f"/api/v1/workers/{self.credentials.worker_id}/heartbeat"
        try:
            reply = await self._request("POST", path, body)
        except RelayRefused as e:
            if e.status not in (401, 404):
                raise
            logger.warning(
                "the relay no longer accepts worker %d (%s); registering again", self.credentials.worker_id, e
            )
            await self.register()
            body["config_version"] = self.config_version
            reply = await self._request("POST", f"/api/v1/workers/{self.credentials.worker_id}/heartbeat", body)
        if reply.get("config_changed") and status != "offline":
            config = await self._request("GET", f"/api/v1/workers/{self.credentials.worker_id}/config")
            await self.apply_config(config["config"])
            self.config_version = int(config["config_version"])
            logger.info("applied relay config version %d: %s", self.config_version, config["config"])
        return reply

    async def run(self, stop: asyncio.Event, status: Callable[[], str]) -> None:
        """Heartbeats every period until `stop`; failures are logged once per kind and retried."""
        while not stop.is_set():
            try:
                await self.beat(status())
                self.last_beat = time.time()
                if self.last_error is not None:
                    logger.info("relay %s reachable again", self.url)
                self.last_error = None
            except Exception as e:  # the relay is optional: never let it take the server down
                message = f"{type(e).__name__}: {e}"
                if message != self.last_error:
                    logger.warning(
                        "relay %s: %s; the server keeps serving and retries in %.0f s", self.url, message, self.period
                    )
                self.last_error = message
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.period)
            except asyncio.TimeoutError:
                pass

    async def goodbye(self) -> None:
        """Tells the relay this server leaves on purpose (not counted as an unexpected drop)."""
        if self.credentials is not None:
            try:
                await asyncio.wait_for(self.beat("offline"), timeout=5)
            except Exception as e:
                logger.info("could not tell the relay goodbye: %s", e)
        if self._session is not None:
            await self._session.close()


def credentials_file(cache: Path, relay_url: str, peer_id: str) -> Path:
    digest = hashlib.sha256(f"{relay_url}|{peer_id}".encode()).hexdigest()[:16]
    return cache / "relay" / f"{digest}.json"
