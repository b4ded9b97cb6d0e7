"""What the route modules need from the running relay: a structural interface, so that `relay.app`
(which builds the routes) and the routes do not import each other."""

from __future__ import annotations

from typing import Mapping, Optional, Protocol

from aiohttp import web

from relay.evidence import EvidenceJudge
from relay.generation import ModelService
from relay.instances import Instances
from relay.jobs import JobQueue
from relay.workers import WorkerRegistry


class RelayContext(Protocol):
    version: str
    started: bool
    is_master: bool
    instances: Instances
    services: Mapping[str, ModelService]
    workers: WorkerRegistry
    jobs: JobQueue
    evidence: EvidenceJudge

    def check_admin(self, request: web.Request) -> None: ...

    def check_api_key(self, request: web.Request) -> str: ...

    def take_recv_flow(self) -> int: ...

    async def model_ready(self, name: str) -> Optional[bool]: ...
