"""The client's loop thread: coroutines from plain calls, and a stop that leaves nothing pending."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from client.runtime import LoopThread


def test_a_coroutine_runs_on_the_loop_and_cancelling_its_future_cancels_it():
    runtime = LoopThread()
    cancelled = concurrent.futures.Future()

    async def forever():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set_result(True)
            raise

    try:
        assert runtime.run(asyncio.sleep(0, result=7), timeout=10) == 7
        future = runtime.submit(forever())
        with pytest.raises(concurrent.futures.TimeoutError):
            future.result(timeout=0.2)
        future.cancel()
        assert cancelled.result(timeout=10) is True
    finally:
        runtime.stop()


def test_stop_cancels_what_still_runs_and_closes_its_async_generators():
    """A bundle link's reader, a check in flight, a stream being read: whatever a client leaves on the
    loop ends when it stops, instead of being reported by the garbage collector ("Task was destroyed
    but it is pending") or finalized on a closed loop."""
    runtime = LoopThread()
    ended: list[str] = []

    async def stream():
        try:
            while True:
                yield await asyncio.sleep(3600)
        finally:
            ended.append("generator")

    async def reader():
        try:
            async for _ in stream():
                pass
        finally:
            ended.append("task")

    async def start():
        asyncio.get_running_loop().create_task(reader())  # no one holds or awaits it
        await asyncio.sleep(0.05)

    runtime.run(start(), timeout=10)
    runtime.stop()
    assert sorted(ended) == ["generator", "task"]
    assert not runtime.loop.is_running()
    assert all(task.done() for task in asyncio.all_tasks(runtime.loop))
