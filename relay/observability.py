"""The observability port: `/metrics` aggregated from every server (seed `motor-coordinator-api`),
the deprecated `/instance/metrics` (410), `/health`, and the swarm's health page."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from relay import metrics
from relay.context import RelayContext
from relay.http import HTTPError, json_reply

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 3.0
SCRAPE_MAX_AGE = 2.0  # requests within this of a scrape share it: no fan-out per anonymous request
MAX_METRICS_BYTES = 1 << 20  # a worker's /metrics larger than this is left out
TYPES = ("full", "instance", "role")


class ObservabilityRoutes:
    def __init__(self, relay: RelayContext):
        self.relay = relay
        self._scraped: Optional[tuple[float, list[metrics.InstanceMetrics]]] = None
        self._scraping = asyncio.Lock()

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/instance/metrics", self.instance_metrics)
        app.router.add_get("/health", self.health)

    async def scrape(self) -> list[metrics.InstanceMetrics]:
        """Every registered server's own /metrics, at most SCRAPE_MAX_AGE old: concurrent requests wait
        for one scrape instead of each fanning out to every worker."""
        async with self._scraping:
            now = asyncio.get_running_loop().time()
            if self._scraped is None or now - self._scraped[0] > SCRAPE_MAX_AGE:
                self._scraped = (now, await self._scrape_now())
            return self._scraped[1]

    async def _scrape_now(self) -> list[metrics.InstanceMetrics]:
        """Fetched now; a server that does not answer, or answers more than MAX_METRICS_BYTES, is left out."""
        rows = [row for row in await self.relay.workers.all_rows() if row["metrics_url"] and not row["offline"]]
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            texts = await asyncio.gather(*(self._fetch(session, row["metrics_url"]) for row in rows))
        return [
            metrics.InstanceMetrics(str(row["id"]), row["role"], text)
            for row, text in zip(rows, texts)
            if text is not None
        ]

    @staticmethod
    async def _fetch(session: aiohttp.ClientSession, url: str) -> Optional[str]:
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    logger.debug("metrics of %s: HTTP %d", url, response.status)
                    return None
                body = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_METRICS_BYTES:
                        logger.warning("metrics of %s are over %d bytes; left out", url, MAX_METRICS_BYTES)
                        return None
                return body.decode("utf-8", errors="replace")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            logger.debug("metrics of %s unreachable: %s", url, e)
        return None

    async def metrics(self, request: web.Request) -> web.Response:
        kind = request.query.get("type", "full")
        if kind not in TYPES:
            raise HTTPError(400, f"type must be one of {', '.join(TYPES)}, got {kind!r}")
        role = request.query.get("role")
        if role is not None and (kind != "role" or role not in metrics.ROLES):
            raise HTTPError(400, f"role is only for type=role and must be one of {', '.join(metrics.ROLES)}")
        instances = await self.scrape()
        if kind == "instance":
            text = metrics.per_instance(instances)
        elif kind == "role":
            text = metrics.by_role(instances, role)
        else:
            text = metrics.aggregated(instances, own=generate_latest(REGISTRY).decode())
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def instance_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            status=410,
            text="# /instance/metrics is deprecated. Use GET /metrics?type=instance instead.\n",
            content_type="text/plain",
        )

    async def health(self, request: web.Request) -> web.Response:
        return json_reply(
            {"status": "ok" if self.relay.started else "starting"}, status=200 if self.relay.started else 503
        )
