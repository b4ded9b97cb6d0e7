"""The API port: worker lifecycle (seed 001), `/v1/workers` (seed `gpustack-workers-api`), reliability
scores and reports, jobs, the OpenAI-compatible API and the OpenAPI document of all of it."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from relay.context import RelayContext
from relay.http import HTTPError, json_reply, path_int, read_body
from relay.openapi import openapi_document
from relay.schemas import (
    EvidenceReport,
    HeartbeatRequest,
    JobRequest,
    LoadConfig,
    RefreshRequest,
    RegisterRequest,
    ReportRequest,
)

logger = logging.getLogger(__name__)


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high}, got {value}")
    return value


class ApiRoutes:
    def __init__(self, relay: RelayContext):
        self.relay = relay

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/v1/workers", self.list_workers)
        r.add_post("/api/v1/workers/register", self.register)
        r.add_get("/api/v1/workers/{worker_id}", self.worker_detail)
        r.add_post("/api/v1/workers/{worker_id}/heartbeat", self.heartbeat)
        r.add_get("/api/v1/workers/{worker_id}/config", self.get_config)
        r.add_put("/api/v1/workers/{worker_id}/config", self.put_config)
        r.add_post("/api/v1/workers/{worker_id}/refresh", self.refresh)
        r.add_get("/api/v1/reliability", self.reliability)
        r.add_post("/api/v1/reports", self.report)
        r.add_post("/api/v1/evidence", self.evidence)
        r.add_get("/api/v1/faults", self.faults)
        r.add_post("/api/v1/jobs", self.submit_job)
        r.add_get("/api/v1/jobs/{job_id}", self.get_job)
        r.add_get("/api/v1/queue/stats", self.queue_stats)

    async def openapi(self, request: web.Request) -> web.Response:
        return json_reply(openapi_document(self.relay.version, tuple(sorted(self.relay.services))))

    async def list_workers(self, request: web.Request) -> web.Response:
        self.relay.check_admin(request)
        page = _query_int(request, "page", 1, 1, 2**31 - 1)
        per_page = _query_int(request, "perPage", 10, 1, 100)
        return json_reply(await self.relay.workers.page(page, per_page))

    async def register(self, request: web.Request) -> web.Response:
        body = await read_body(request, RegisterRequest)
        signed = json.loads(await request.read())  # valid JSON: read_body parsed it
        join_token = request.headers.get("X-Join-Token") or body.join_token
        reply = await self.relay.workers.register(
            body, signed, f"{request.scheme}://{request.host}", request.remote or "", join_token
        )
        return json_reply(reply, status=201)

    async def worker_detail(self, request: web.Request) -> web.Response:
        self.relay.check_admin(request)
        return json_reply(await self.relay.workers.detail(path_int(request, "worker_id")))

    async def _signed(self, request: web.Request) -> tuple[dict, bytes]:
        worker_id = path_int(request, "worker_id")
        raw = await request.read()
        row = await self.relay.workers.authenticate(
            worker_id, request.method, request.path, raw, request.headers, request.remote or ""
        )
        return row, raw

    async def heartbeat(self, request: web.Request) -> web.Response:
        row, _ = await self._signed(request)
        body = await read_body(request, HeartbeatRequest)
        return json_reply(await self.relay.workers.heartbeat(row, body, request.remote or row["ip"]))

    async def get_config(self, request: web.Request) -> web.Response:
        """A worker reads its own config (signed); the operator may read any (admin token)."""
        worker_id = path_int(request, "worker_id")
        if "X-Signature" in request.headers:
            await self._signed(request)
        else:
            self.relay.check_admin(request)
        return json_reply(await self.relay.workers.get_config(worker_id))

    async def put_config(self, request: web.Request) -> web.Response:
        self.relay.check_admin(request)
        worker_id = path_int(request, "worker_id")
        body = await read_body(request, LoadConfig)
        return json_reply(await self.relay.workers.put_config(worker_id, body))

    async def refresh(self, request: web.Request) -> web.Response:
        worker_id = path_int(request, "worker_id")
        raw = await request.read()
        body = await read_body(request, RefreshRequest)
        reply = await self.relay.workers.refresh(
            worker_id, body.refresh_token, request.method, request.path, raw, request.headers, request.remote or ""
        )
        return json_reply(reply)

    async def reliability(self, request: web.Request) -> web.Response:
        self.relay.check_api_key(request)
        scores = await self.relay.workers.scores()
        return json_reply({"object": "list", "data": [{"peer_id": p, "score": s} for p, s in sorted(scores.items())]})

    async def report(self, request: web.Request) -> web.Response:
        reporter = self.relay.check_api_key(request)
        body = await read_body(request, ReportRequest)
        counted = await self.relay.workers.record_report(reporter, body.peer_id, body.success, body.latency_ms)
        if not counted:
            raise HTTPError(404, f"no registered worker has peer id {body.peer_id!r}")
        return json_reply({"recorded": counted})

    async def evidence(self, request: web.Request) -> web.Response:
        accuser = self.relay.check_api_key(request)
        body = await read_body(request, EvidenceReport)
        return json_reply(await self.relay.evidence.judge(accuser, body), status=201)

    async def faults(self, request: web.Request) -> web.Response:
        self.relay.check_admin(request)
        return json_reply({"object": "list", "data": await self.relay.evidence.faults()})

    async def submit_job(self, request: web.Request) -> web.Response:
        self.relay.check_api_key(request)
        body = await read_body(request, JobRequest)
        return json_reply(await self.relay.jobs.submit(body), status=201)

    async def get_job(self, request: web.Request) -> web.Response:
        self.relay.check_api_key(request)
        return json_reply(await self.relay.jobs.get(request.match_info["job_id"]))

    async def queue_stats(self, request: web.Request) -> web.Response:
        self.relay.check_api_key(request)
        stats = await self.relay.jobs.stats()
        workers = await self.relay.workers.counts()
        return json_reply({**stats, "workers_ready": workers["ready"], "workers_total": workers["total"]})
