"""The relay's storage under concurrent writes and floods: every write counted, every queue bounded,
older databases upgraded."""

from __future__ import annotations

import asyncio

from cryptography.fernet import Fernet

from relay.http import HTTPError
from relay.jobs import JobQueue
from relay.schemas import JobRequest, LoadConfig, RegisterRequest
from relay.store import Store
from relay.workers import WorkerRegistry
from tests.helpers.relay_process import signed_registration


async def test_concurrent_outcomes_and_config_pushes_are_all_counted(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'relay.db'}")
    await store.open()
    try:
        registry = WorkerRegistry(store, Fernet.generate_key(), heartbeat_timeout=60)
        signed = signed_registration("racer", "http://127.0.0.1:8000")
        body = RegisterRequest(**signed)
        worker_id = (await registry.register(body, signed, "http://127.0.0.1:8000", "127.0.0.1", None))["worker_id"]

        await asyncio.gather(
            *(registry.record_outcome(body.peer_id, True, latency_ms=100) for _ in range(30)),
            *(registry.record_outcome(body.peer_id, False) for _ in range(10)),
        )
        row = await registry.row(worker_id)
        assert (row["tasks_succeeded"], row["tasks_failed"]) == (30, 10)
        assert row["latency_ms"] == 100

        pushes = await asyncio.gather(
            *(registry.put_config(worker_id, LoadConfig(acceptance_rate=0.5)) for _ in range(20))
        )
        assert sorted(push["config_version"] for push in pushes) == list(range(2, 22))
        assert (await registry.row(worker_id))["config_version"] == 21
    finally:
        await store.close()


class _AcceptingService:
    """Stands in for a model service at submission time: the queue's admission is what is tested."""

    async def chat_request(self, *args, **kwargs):
        return None


async def test_a_full_job_queue_refuses_with_429_and_retry_after(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'relay.db'}")
    await store.open()
    try:
        queue = JobQueue(store, {"m": _AcceptingService()}, runners=1, max_queued=5)  # not started: nothing runs
        body = JobRequest(type="llm", model="m", messages=[{"role": "user", "content": "hi"}])
        results = await asyncio.gather(*(queue.submit(body) for _ in range(8)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, HTTPError)]
        assert len(results) - len(refused) == 5 and len(refused) == 3
        assert all(
            e.status == 429 and e.headers == {"Retry-After": "30"} and "queue is full" in e.message for e in refused
        )
        assert (await queue.stats())["queued"] == 5
    finally:
        await store.close()


async def test_a_database_from_before_the_report_counters_gets_them_on_open(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE workers (id INTEGER PRIMARY KEY AUTOINCREMENT, peer_id TEXT, tasks_failed BIGINT)")
        old.execute("INSERT INTO workers (peer_id, tasks_failed) VALUES ('QmOld', 3)")
    store = Store(f"sqlite:///{path}")
    await store.open()
    try:
        row = await store.fetch_one("SELECT * FROM workers WHERE peer_id = 'QmOld'")
        assert (row["tasks_failed"], row["reports_succeeded"], row["reports_failed"]) == (3, 0, 0)
    finally:
        await store.close()


async def test_metrics_scrapes_are_shared_between_requests_and_capped_in_size():
    """Many /metrics requests at once cost each worker one scrape, and a worker answering megabytes is left out."""
    from types import SimpleNamespace

    from aiohttp import web

    from relay.observability import MAX_METRICS_BYTES, ObservabilityRoutes

    hits = {"small": 0, "huge": 0}

    async def small(request):
        hits["small"] += 1
        await asyncio.sleep(0.2)  # a slow worker: concurrent requests arrive during the scrape
        return web.Response(text="swarm_up 1\n")

    async def huge(request):
        hits["huge"] += 1
        return web.Response(body=b"#" * (MAX_METRICS_BYTES + 10))

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/huge", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rows = [
        {"id": 1, "role": "mixed", "offline": 0, "metrics_url": f"http://127.0.0.1:{port}/small"},
        {"id": 2, "role": "mixed", "offline": 0, "metrics_url": f"http://127.0.0.1:{port}/huge"},
    ]

    async def all_rows():
        return rows

    routes = ObservabilityRoutes(SimpleNamespace(workers=SimpleNamespace(all_rows=all_rows)))
    try:
        results = await asyncio.gather(*(routes.scrape() for _ in range(20)))
        assert hits == {"small": 1, "huge": 1}
        assert all([m.instance_id for m in result] == ["1"] for result in results)
    finally:
        await runner.cleanup()


async def test_readiness_probes_share_fresh_crawls(tmp_path):
    """Anyone may probe readiness: a burst of probes costs one crawl of the DHT, not one each."""
    from types import SimpleNamespace

    from configs.schema import RelayOptions
    from relay.app import Relay

    class CountingCrawler:
        def __init__(self):
            self.crawls = 0
            self.state = SimpleNamespace(models=[])

        async def crawl(self):
            self.crawls += 1
            await asyncio.sleep(0.05)

    relay = Relay(RelayOptions(db=f"sqlite:///{tmp_path / 'relay.db'}"))
    relay.crawler = CountingCrawler()
    answers = await asyncio.gather(*(relay.model_ready("nobody-serves-this") for _ in range(20)))
    assert answers == [None] * 20 and relay.crawler.crawls == 1
