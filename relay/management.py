"""The management port: probes, service info, instances, primary/standby (seeds `motor-` and
`mindie-coordinator-api`) and LMCache's `query_worker_info`. Writes need the admin token."""

from __future__ import annotations

import logging
import time
import uuid

from aiohttp import web

from relay.context import RelayContext
from relay.http import HTTPError, json_reply, read_body
from relay.schemas import BackupInfo, InstanceIds, QueryTasksRequest, QueryWorkerInfoRequest, RefreshInstancesRequest
from relay.timestamps import iso

logger = logging.getLogger(__name__)

ENDPOINTS = {
    "GET /": "service info and this index",
    "GET /startup": "startup probe",
    "GET /liveness": "liveness check",
    "GET /readiness": "readiness check (503 when not ready or standby)",
    "GET /v1/startup": "startup probe (empty body)",
    "GET /v1/health": "health probe (empty body)",
    "GET /v1/readiness": "readiness probe (empty body)",
    "GET /v2/health/live": "Triton liveness (empty body)",
    "GET /v2/health/ready": "Triton readiness (empty body)",
    "GET /v2/models/{name}/ready": "whether the swarm can run a model (empty body)",
    "POST /instances/refresh": "refresh instances (add/del/set)",
    "POST /v1/instances/offline": "take instances offline",
    "POST /v1/instances/online": "bring instances back online",
    "POST /v1/instances/query_tasks": "whether tasks between two instances have ended",
    "GET /recvs_info": "primary/standby role and requests received since the last call",
    "POST /backup_info": "set the primary/standby role",
    "POST /query_worker_info": "worker details (LMCache controller format)",
}


class ManagementRoutes:
    def __init__(self, relay: RelayContext):
        self.relay = relay

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/startup", self.startup)
        r.add_get("/liveness", self.liveness)
        r.add_get("/readiness", self.readiness)
        for path in ("/v1/startup", "/v1/health", "/v2/health/live"):
            r.add_get(path, self.alive_empty)
        for path in ("/v1/readiness", "/v2/health/ready"):
            r.add_get(path, self.ready_empty)
        r.add_get("/v2/models/{name}/ready", self.model_ready)
        r.add_post("/instances/refresh", self.refresh_instances)
        r.add_post("/v1/instances/offline", self.offline)
        r.add_post("/v1/instances/online", self.online)
        r.add_post("/v1/instances/query_tasks", self.query_tasks)
        r.add_get("/recvs_info", self.recvs_info)
        r.add_post("/backup_info", self.backup_info)
        r.add_post("/query_worker_info", self.query_worker_info)

    async def index(self, request: web.Request) -> web.Response:
        return json_reply(
            {
                "service": "Swarm Relay Management Server",
                "version": self.relay.version,
                "description": "Management plane: liveness, startup, readiness, instances, primary/standby",
                "endpoints": ENDPOINTS,
                "timestamp": iso(time.time()),
            }
        )

    async def startup(self, request: web.Request) -> web.Response:
        if not self.relay.started:
            return json_reply({"status": "error", "message": "Coordinator is still starting"}, status=503)
        return json_reply({"status": "ok", "message": "Coordinator is starting up"})

    async def liveness(self, request: web.Request) -> web.Response:
        return json_reply({"status": "ok", "message": "Coordinator is alive"})

    async def readiness(self, request: web.Request) -> web.Response:
        if not self.relay.started:
            return json_reply(
                {"status": "error", "message": "Coordinator is still starting", "ready": False}, status=503
            )
        if not self.relay.is_master:
            return json_reply({"status": "error", "message": "Coordinator is not master", "ready": False}, status=503)
        return json_reply({"status": "ok", "message": "Coordinator is ok", "ready": True})

    async def alive_empty(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.relay.started else 503)

    async def ready_empty(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.relay.started and self.relay.is_master else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ready = await self.relay.model_ready(name)
        if ready is None:
            raise HTTPError(404, f"no model named {name!r} in this swarm")
        return web.Response(status=200 if ready else 503)

    def _write_allowed(self, request: web.Request) -> None:
        self.relay.check_admin(request)

    async def refresh_instances(self, request: web.Request) -> web.Response:
        self._write_allowed(request)
        body = await read_body(request, RefreshInstancesRequest)
        count = self.relay.instances.refresh(body.event, body.instances)
        logger.info("instances refreshed: %s of %d", body.event, count)
        return json_reply(
            {
                "request_id": request.headers.get("X-Request-Id", "refresh_request"),
                "status": "success",
                "message": "Instance refresh completed",
                "data": {"timestamp": iso(time.time()), "event_type": body.event, "instance_count": count},
            }
        )

    async def _known(self, ids: list[int]) -> None:
        known = set(self.relay.instances.declared) | {row["id"] for row in await self.relay.workers.all_rows()}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise HTTPError(404, f"no such instance(s): {', '.join(map(str, unknown[:20]))}")

    async def _set_offline(self, request: web.Request, offline: bool) -> web.Response:
        self._write_allowed(request)
        if not self.relay.started or not self.relay.is_master:
            raise HTTPError(503, "Coordinator is not ready")
        body = await read_body(request, InstanceIds)
        await self._known(body.ids)
        self.relay.instances.set_offline(body.ids, offline)
        logger.info("instances %s taken %s", body.ids[:20], "offline" if offline else "online")
        return web.Response(status=200)

    async def offline(self, request: web.Request) -> web.Response:
        return await self._set_offline(request, True)

    async def online(self, request: web.Request) -> web.Response:
        return await self._set_offline(request, False)

    async def query_tasks(self, request: web.Request) -> web.Response:
        self._write_allowed(request)
        body = await read_body(request, QueryTasksRequest)
        await self._known([body.p_id, body.d_id])
        # Prefill and decode are not split across instances here: no task ever waits between two of them.
        return json_reply({"is_end": True})

    async def recvs_info(self, request: web.Request) -> web.Response:
        return json_reply({"is_master": self.relay.is_master, "recv_flow": self.relay.take_recv_flow()})

    async def backup_info(self, request: web.Request) -> web.Response:
        self._write_allowed(request)
        body = await read_body(request, BackupInfo)
        if body.is_master != self.relay.is_master:
            logger.warning("role changed by the controller: now %s", "primary" if body.is_master else "standby")
        if body.is_abnormal:
            logger.warning("the controller reports both coordinators receiving requests")
        self.relay.is_master = body.is_master
        return json_reply({"update_successfully": True})

    async def query_worker_info(self, request: web.Request) -> web.Response:
        self._write_allowed(request)
        body = await read_body(request, QueryWorkerInfoRequest)
        rows = [row for row in await self.relay.workers.all_rows() if row["model"] == body.instance_id]
        if not rows and body.instance_id not in self.relay.services:
            raise HTTPError(404, f"no such instance: {body.instance_id!r} (instances are model names)")
        wanted = set(body.worker_ids)
        infos = [
            {
                "instance_id": body.instance_id,
                "worker_id": row["id"],
                "ip": row["ip"],
                "port": row["port"],
                "peer_init_url": f"{row['ip']}:{row['port']}",
                "registration_time": int(row["created_at"]),
                "last_heartbeat_time": int(row["heartbeat_time"] or 0),
            }
            for row in rows
            if row["id"] in wanted
        ]
        return json_reply({"event_id": uuid.uuid4().hex, "worker_infos": infos})
