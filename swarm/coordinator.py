"""This server as a relay's worker: what it registers with (signed by its identity), what each
heartbeat reports, and the load-control config the relay pushes back. The HTTP exchange itself
(credentials, signatures, token rotation) is `swarm.relay_link`."""

from __future__ import annotations

import asyncio
import platform
import socket
import time
from typing import Awaitable, Callable, Optional

from configs.paths import cache_dir
from configs.schema import ServerOptions, WorkingHours
from dht.swarm_dht import SwarmDHT
from protocol.registration import sign_registration
from swarm.hardware import probe_status
from swarm.load_control import LoadControl, LoadPolicy
from swarm.relay_link import RelayLink, credentials_file


class Coordinator:
    """`load()` gives the heartbeat's load figures; `metrics_port()` the server's Prometheus port;
    `announce()` republishes the record after a pushed config changed what it says."""

    def __init__(
        self,
        options: ServerOptions,
        dht: SwarmDHT,
        model_name: str,
        load_control: LoadControl,
        load: Callable[[], dict],
        latency_ms: Callable[[], Optional[float]],
        metrics_port: Callable[[], Optional[int]],
        announce: Callable[[], Awaitable[None]],
    ):
        self.options = options
        self.dht = dht
        self.model_name = model_name
        self.load_control = load_control
        self.load = load
        self.latency_ms = latency_ms
        self.metrics_port = metrics_port
        self.announce = announce
        self.link = RelayLink(
            options.relay,
            credentials_file(cache_dir(), options.relay, dht.peer_id),
            registration=self.registration,
            heartbeat=self.heartbeat,
            apply_config=self.apply_config,
            period=options.relay_heartbeat_period,
            join_token=options.relay_join_token,
        )

    async def registration(self, relay_url: str) -> dict:
        hostname = socket.gethostname()
        status = await asyncio.to_thread(probe_status, self.options.device)
        return sign_registration(
            self.dht.validator,
            relay_url,
            {
                "name": self.options.public_name or f"{hostname}-{self.dht.peer_id[-8:]}",
                "hostname": hostname,
                "port": self.dht.port,
                "peer_id": self.dht.peer_id,
                "signed_at": int(time.time()),
                "model": self.model_name,
                "role": self.options.role,
                "region": self.options.region,
                "labels": {"os": platform.system().lower(), "arch": platform.machine().lower()},
                "status": status.model_dump(mode="json"),
                "metrics_port": self.metrics_port(),
            },
        )

    async def heartbeat(self) -> dict:
        return {
            "load": self.load(),
            "hardware": (await asyncio.to_thread(probe_status, self.options.device)).model_dump(mode="json"),
            "latency_ms": self.latency_ms(),
            "metrics_port": self.metrics_port(),
        }

    async def apply_config(self, config: dict) -> None:
        """Load control pushed by the relay replaces the local settings until the next restart."""
        hours = config.get("working_hours")
        self.load_control.policy = LoadPolicy(
            acceptance_rate=float(config.get("acceptance_rate", 1.0)),
            max_concurrent_sessions=config.get("max_concurrent_sessions"),
            max_sessions_per_hour=config.get("max_sessions_per_hour"),
            working_hours=WorkingHours.parse(hours) if hours else None,
        )
        await self.announce()
