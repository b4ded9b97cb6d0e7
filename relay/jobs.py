"""The job queue (seed 001): submitted LLM jobs are stored, run through the swarm in order of arrival
by a bounded number of runners, and kept with their result. A job that was running when the relay
stopped is queued again at the next start, so nothing submitted is lost."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Mapping, Optional

from relay.generation import ModelService, Request, find_model
from relay.http import HTTPError
from relay.schemas import JobRequest
from relay.store import Store, dumps, loads
from relay.timestamps import iso

logger = logging.getLogger(__name__)

STATUSES = ("queued", "running", "completed", "failed")


class JobQueue:
    def __init__(self, store: Store, services: Mapping[str, ModelService], runners: int, max_queued: int = 1000):
        self.store = store
        self.services = services
        self.runners = runners
        self.max_queued = max_queued
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._claim = asyncio.Lock()
        self._admit = asyncio.Lock()

    async def start(self) -> None:
        requeued = await self.store.execute(
            "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
        )
        if requeued:
            logger.info("%d job(s) interrupted by the last stop are queued again", requeued)
        self._tasks = [asyncio.create_task(self._runner()) for _ in range(self.runners)]
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def submit(self, body: JobRequest) -> dict[str, Any]:
        await self._request(body)  # refuse an unknown model or a too long job now, not when it runs
        job_id = uuid.uuid4().hex
        now = time.time()
        async with self._admit:  # count and insert as one: concurrent submissions cannot overshoot the cap
            row = await self.store.fetch_one("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'")
            if row["n"] >= self.max_queued:
                raise HTTPError(
                    429, f"the job queue is full ({row['n']} jobs waiting); retry later", headers={"Retry-After": "30"}
                )
            await self.store.insert(
                "jobs",
                {
                    "id": job_id,
                    "type": body.type,
                    "model": body.model,
                    "status": "queued",
                    "request": dumps(body.model_dump()),
                    "created_at": now,
                },
            )
        self._wake.set()
        return {"job_id": job_id, "status": "queued", "created_at": iso(now)}

    async def get(self, job_id: str) -> dict[str, Any]:
        row = await self.store.fetch_one("SELECT * FROM jobs WHERE id = ?", job_id)
        if row is None:
            raise HTTPError(404, f"no such job: {job_id}")
        return {
            "job_id": row["id"],
            "type": row["type"],
            "model": row["model"],
            "status": row["status"],
            "result": loads(row["result"]),
            "error": row["error"],
            "created_at": iso(row["created_at"]),
            "started_at": iso(row["started_at"]),
            "completed_at": iso(row["finished_at"]),
        }

    async def stats(self) -> dict[str, int]:
        rows = await self.store.fetch("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        counts = {status: 0 for status in STATUSES}
        counts.update({row["status"]: row["n"] for row in rows})
        counts["total"] = sum(counts[s] for s in STATUSES)
        return counts

    async def _next(self) -> Optional[dict[str, Any]]:
        async with self._claim:
            row = await self.store.fetch_one("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created_at LIMIT 1")
            if row is not None:
                await self.store.update("jobs", "id", row["id"], {"status": "running", "started_at": time.time()})
            return row

    async def _runner(self) -> None:
        while True:
            row = await self._next()
            if row is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._run(row)

    async def _request(self, body: JobRequest) -> tuple[ModelService, Request]:
        service, adapter = await find_model(self.services, body.model)
        request = await service.chat_request(
            body.messages, body.max_tokens, body.temperature, body.top_p, region=body.region, adapter=adapter
        )
        return service, request

    async def _run(self, row: dict[str, Any]) -> None:
        values: dict[str, Any]
        try:
            service, request = await self._request(JobRequest.model_validate(loads(row["request"])))
            result = await service.generate(request)
            values = {
                "status": "completed",
                "result": dumps(
                    {
                        "text": result.text,
                        "finish_reason": result.finish_reason,
                        "usage": {
                            "prompt_tokens": result.prompt_tokens,
                            "completion_tokens": result.completion_tokens,
                            "total_tokens": result.prompt_tokens + result.completion_tokens,
                        },
                    }
                ),
            }
        except HTTPError as e:
            values = {"status": "failed", "error": e.message}
        except Exception as e:
            logger.exception("job %s failed", row["id"])
            values = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        values["finished_at"] = time.time()
        await self.store.update("jobs", "id", row["id"], values)
        logger.info("job %s %s", row["id"], values["status"])
