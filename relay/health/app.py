"""The public health page over aiohttp: `GET /` (HTML), `GET /api/v1/state` (the same data as JSON)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from relay.health.crawler import Crawler
from relay.health.page import render_fragment, render_page

logger = logging.getLogger(__name__)

CRAWLER = web.AppKey("crawler", Crawler)


async def index(request: web.Request) -> web.Response:
    crawler = request.app[CRAWLER]
    if request.query.get("fragment"):
        return web.Response(text=render_fragment(crawler.state), content_type="text/html")
    return web.Response(text=render_page(crawler.state, crawler.period), content_type="text/html")


async def state(request: web.Request) -> web.Response:
    crawler = request.app[CRAWLER]
    if crawler.state is None:
        return web.json_response({"error": "the first crawl of the swarm has not finished yet"}, status=503)
    return web.json_response(crawler.state.model_dump(mode="json"))


def make_app(crawler: Crawler) -> web.Application:
    app = web.Application()
    add_health_routes(app, crawler)
    return app


def add_health_routes(app: web.Application, crawler: Crawler) -> None:
    """The page at `/` and its JSON at `/api/v1/state`, crawling in the background while `app` runs."""
    app[CRAWLER] = crawler
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/state", state)

    async def crawl_in_background(app: web.Application):
        task = asyncio.create_task(crawler.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(crawl_in_background)
