"""The relay process: state, its three HTTP ports, its DHT node and its background loops.

management (1026): probes, service info, instances, primary/standby
observability (1027): /metrics, the health page
API (8000): workers, jobs, the OpenAI-compatible API, /openapi.json
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from aiohttp import web

from configs.schema import RelayOptions
from dht.records import ServerState
from dht.swarm_dht import SwarmDHT, start_dht
from relay.api import ApiRoutes
from relay.auth import hash_secret, secret_matches
from relay.evidence import OWN_ACCUSER, EvidenceJudge
from relay.generation import ModelService
from relay.health.app import add_health_routes
from relay.health.crawler import Crawler
from relay.http import HTTPError, make_app
from relay.instances import Instances
from relay.jobs import JobQueue
from relay.management import ManagementRoutes
from relay.observability import ObservabilityRoutes
from relay.openai_api import OpenAIRoutes
from relay.schemas import EvidenceReport
from relay.store import Store
from relay.workers import WorkerRegistry, bearer_token, load_or_create_key
from telemetry import tracing
from verification.evidence import Evidence, evidence_body

logger = logging.getLogger(__name__)

try:
    VERSION = version("swarm-inference")
except PackageNotFoundError:  # a source tree that was not installed
    VERSION = "0.0.0+source"

ADMIN_SETTING = "admin_token_sha256"
JOIN_SETTING = "join_token_sha256"
FRESH_CRAWL_MIN_INTERVAL = 2.0
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/api/v1/jobs"})  # what `recv_flow` counts


class Relay:
    def __init__(self, options: RelayOptions):
        self.options = options
        self.version = VERSION
        self.store = Store(options.db)
        self.started = False
        self.is_master = not options.standby
        self.instances = Instances()
        self.services: dict[str, ModelService] = {}
        self.api_key_hashes = [hash_secret(key) for key in options.api_keys]
        self.admin_hash: Optional[str] = None
        self.generated_admin_token: Optional[str] = None
        self.generated_join_token: Optional[str] = None
        self.workers: Optional[WorkerRegistry] = None
        self.jobs: Optional[JobQueue] = None
        self.evidence: Optional[EvidenceJudge] = None
        self.crawler: Optional[Crawler] = None
        self.dht: Optional[SwarmDHT] = None
        self.ports: dict[str, int] = {}
        self._recv_flow = 0
        self._crawling = asyncio.Lock()
        self._last_fresh_crawl = float("-inf")
        self._scores: dict[str, float] = {}
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task] = []
        self._outcomes: set[asyncio.Task] = set()  # held until done, so none is garbage-collected mid-write
        self._p2p = None
        self._executor = ThreadPoolExecutor(
            max_workers=options.max_concurrent_generations, thread_name_prefix="relay-generate"
        )

    # ---- authentication ----------------------------------------------------------------------

    def check_admin(self, request: web.Request) -> None:
        token = bearer_token(request.headers)
        if token is None or self.admin_hash is None or not secret_matches(token, self.admin_hash):
            raise HTTPError(
                401,
                "this endpoint needs the relay's admin token: Authorization: Bearer <token>",
                {"WWW-Authenticate": "Bearer"},
            )

    def check_api_key(self, request: web.Request) -> str:
        """The SHA-256 of the valid API key the request presents (who is asking), or a 401."""
        presented = [key for key in (request.headers.get("X-API-Key"), bearer_token(request.headers)) if key]
        for key in presented:
            digest = hash_secret(key)
            if any(hmac.compare_digest(digest, known) for known in self.api_key_hashes):
                return digest
        raise HTTPError(
            401,
            "this endpoint needs an API key: X-API-Key: <key> or Authorization: Bearer <key>",
            {"WWW-Authenticate": "Bearer"},
        )

    def take_recv_flow(self) -> int:
        flow, self._recv_flow = self._recv_flow, 0
        return flow

    async def model_ready(self, name: str) -> Optional[bool]:
        """Whether every block of `name` has an online server; None if the swarm has no such model.

        Anything but a healthy answer from the last crawl is checked again with a fresh crawl."""
        if self.crawler is None:
            return None
        for fresh in (False, True):
            if fresh:
                await self._fresh_crawl()
            state = self.crawler.state
            found = next((m for m in state.models if m.name == name), None) if state is not None else None
            if found is not None and found.healthy:
                return True
        return None if found is None else False

    async def _fresh_crawl(self) -> None:
        """A crawl now, unless one finished within FRESH_CRAWL_MIN_INTERVAL: readiness probes (anyone may
        send them) share crawls instead of each costing a DHT read and a ping of every server."""
        async with self._crawling:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last_fresh_crawl >= FRESH_CRAWL_MIN_INTERVAL:
                await self.crawler.crawl()
                self._last_fresh_crawl = loop.time()

    def _own_evidence(self, loop: asyncio.AbstractEventLoop, evidence: Evidence) -> None:
        """The relay's own generations prove servers wrong too: their evidence is judged like anyone's."""
        if not evidence.receipts:
            return
        report = EvidenceReport.model_validate(evidence_body(evidence))
        future = asyncio.run_coroutine_threadsafe(self.evidence.judge(OWN_ACCUSER, report), loop)
        future.add_done_callback(
            lambda done: (
                done.exception()
                and logger.warning(
                    "the relay's own evidence against %s was not counted: %s", evidence.peer_id, done.exception()
                )
            )
        )

    async def _scores_for_routing(self) -> dict[str, float]:
        return self._scores

    def _record_outcome(self, loop: asyncio.AbstractEventLoop, peer_id: str, success: bool) -> None:
        """Called from generation threads: counts the outcome on the relay's loop."""

        def record() -> None:
            task = asyncio.ensure_future(self.workers.record_outcome(peer_id, success))
            self._outcomes.add(task)
            task.add_done_callback(self._outcome_done)

        loop.call_soon_threadsafe(record)

    def _outcome_done(self, task: asyncio.Task) -> None:
        self._outcomes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not record a session outcome: %s", task.exception())

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _stored_secret(self, setting: str, given: Optional[str]) -> tuple[str, Optional[str]]:
        """The hash of `given` (kept), else the hash kept from an earlier start, else of a new secret
        made now (returned too, so it can be shown once)."""
        stored = await self.store.get_setting(setting)
        if given:
            digest = hash_secret(given)
            if stored != digest:
                await self.store.set_setting(setting, digest)
            return digest, None
        if stored:
            return stored, None
        generated = "swarm_" + secrets.token_urlsafe(32)
        await self.store.set_setting(setting, hash_secret(generated))
        return hash_secret(generated), generated

    async def _admin_token(self) -> None:
        self.admin_hash, self.generated_admin_token = await self._stored_secret(ADMIN_SETTING, self.options.admin_token)

    async def _join_token_hash(self) -> Optional[str]:
        """None only with --open-registration; otherwise servers must present the join token."""
        if self.options.open_registration:
            return None
        digest, self.generated_join_token = await self._stored_secret(JOIN_SETTING, self.options.join_token)
        return digest

    def _key_path(self) -> Path:
        if self.options.key_file:
            return Path(self.options.key_file)
        sqlite = self.store.sqlite_path
        if sqlite is not None and str(sqlite) != ":memory:":
            return sqlite.with_name(sqlite.name + ".key")
        return Path("relay.key")

    async def start(self) -> None:
        opts = self.options
        await self.store.open()
        await self._admin_token()
        self.workers = WorkerRegistry(
            self.store, load_or_create_key(self._key_path()), opts.heartbeat_timeout, await self._join_token_hash()
        )
        self.workers.offline_ids = self.instances.offline
        dht, validator = start_dht(
            opts.initial_peers,
            host=opts.host,
            port=opts.dht_port,
            nat_port_map=opts.nat_port_map,
            announce_maddrs=opts.announce_maddrs,
        )
        self.dht = SwarmDHT(dht, validator)
        self._p2p = await dht.replicate_p2p()
        self.crawler = Crawler(self.dht, self._p2p, opts.refresh_period)
        peers = list(opts.initial_peers) or self.dht.visible_maddrs()
        loop = asyncio.get_running_loop()
        for path in opts.models:
            service = await asyncio.to_thread(
                ModelService,
                path,
                peers,
                self._executor,
                opts.request_timeout,
                self._scores_for_routing,
                opts.min_reliability,
                lambda peer, ok: self._record_outcome(loop, peer, ok),
                opts.verify,
                opts.prompt_lookup,
            )
            self.services[service.name] = service
            logger.info("serving model %s from %s", service.name, path)
        if opts.otlp_endpoint:  # after every DHT process is forked: they need no exporter thread of their own
            tracing.enable(opts.otlp_endpoint, "swarm-relay")
        self.jobs = JobQueue(self.store, self.services, opts.max_concurrent_generations, opts.max_queued_jobs)
        self.evidence = EvidenceJudge(self.store, self.services, lambda: self.dht, self._executor)
        for service in self.services.values():
            service.model.on_wrong_result(lambda evidence: self._own_evidence(loop, evidence))
        await self.jobs.start()
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        if opts.verify_rate > 0:
            self._tasks.append(asyncio.create_task(self._canaries()))

        management, observability, api = make_app(), make_app(), make_app()
        ManagementRoutes(self).add_to(management)
        ObservabilityRoutes(self).add_to(observability)
        add_health_routes(observability, self.crawler)
        ApiRoutes(self).add_to(api)
        OpenAIRoutes(self.services, self.check_api_key).add_to(api)
        api.middlewares.append(self._count_requests)
        for name, app, port in (
            ("mgmt", management, opts.mgmt_port),
            ("obs", observability, opts.obs_port),
            ("api", api, opts.api_port),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, opts.host, port)
            await site.start()
            self._runners.append(runner)
            self.ports[name] = runner.addresses[0][1]  # the port bound (0 asks for a free one)
        self.started = True

    @web.middleware
    async def _count_requests(self, request: web.Request, handler):
        """Counts inference requests (not heartbeats or status reads) for `GET /recvs_info`."""
        if request.method == "POST" and request.path in INFERENCE_PATHS:
            self._recv_flow += 1
        return await handler(request)

    async def _housekeeping(self) -> None:
        """Marks lost workers and refreshes the scores the relay's own routing uses."""
        while True:
            try:
                await self.workers.sweep()
                self._scores = await self.workers.scores()
            except Exception:
                logger.warning("housekeeping failed; will retry", exc_info=True)
            await asyncio.sleep(min(self.options.refresh_period, self.options.heartbeat_timeout / 3))

    async def _canaries(self) -> None:
        """Every refresh period, each online server of a served model gets a canary with probability
        `--verify-rate` (`EvidenceJudge.canary`)."""
        rng = random.Random()
        while True:
            await asyncio.sleep(self.options.refresh_period)
            try:
                for service in list(self.services.values()):
                    servers = await self.dht.fetch_servers(service.name, service.model.checkpoint.num_blocks)
                    online = {
                        info.peer_id: info
                        for block in servers
                        for info in block.values()
                        if info.record.state == ServerState.ONLINE
                    }
                    for info in online.values():
                        if rng.random() < self.options.verify_rate:
                            await self.evidence.canary(service, info, self._p2p, self.options.request_timeout)
            except Exception:
                logger.warning("canary round failed; will retry", exc_info=True)

    async def stop(self) -> None:
        self.started = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.jobs is not None:
            await self.jobs.stop()
        for runner in self._runners:
            await runner.cleanup()
        for service in self.services.values():
            await asyncio.to_thread(service.shutdown)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._p2p is not None:
            await self._p2p.shutdown()
        if self.dht is not None:
            self.dht.dht.shutdown()
        await self.store.close()
        tracing.flush()
