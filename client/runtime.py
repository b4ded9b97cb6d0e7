"""A background event loop thread: the client's network code is asyncio, its public API is plain calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from typing import Any, Coroutine, Optional

logger = logging.getLogger(__name__)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Starts `coro` on the loop (from any other thread) and returns its future; cancelling the future
        cancels the coroutine. It runs in a copy of the caller's context, so that what the caller set
        (its current trace span) holds inside it too."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread called from its own loop; await the coroutine instead")
        context = contextvars.copy_context()
        result: concurrent.futures.Future = concurrent.futures.Future()

        def finished(task: asyncio.Task) -> None:
            try:
                if task.cancelled():
                    result.cancel()
                elif task.exception() is not None:
                    result.set_exception(task.exception())
                else:
                    result.set_result(task.result())
            except concurrent.futures.InvalidStateError:
                pass  # the caller cancelled it meanwhile

        def start() -> None:
            if result.cancelled():
                coro.close()
                return
            task = self.loop.create_task(coro, context=context)
            task.add_done_callback(finished)
            result.add_done_callback(lambda done: done.cancelled() and self.loop.call_soon_threadsafe(task.cancel))

        self.loop.call_soon_threadsafe(start)
        return result

    def run(self, coro: Coroutine[Any, Any, Any], timeout: Optional[float] = None) -> Any:
        """Runs `coro` on the loop and waits for its result (see `submit`)."""
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancels every task still on the loop (bundle links' readers, checks in flight, streams) and
        waits up to `timeout` for them to finish, then stops the loop: nothing is left pending for the
        garbage collector to report ("Task was destroyed but it is pending") or to finalize on a closed
        loop."""
        if not self.loop.is_running():
            return
        try:
            self.run(_cancel_others(timeout), timeout=timeout + 1)
        except Exception:
            logger.debug("tasks still running when the loop stopped", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def _cancel_others(timeout: float) -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    await asyncio.get_running_loop().shutdown_asyncgens()
