"""A single compute thread that owns all torch work, so the event loop never blocks on a matmul.

It is also the only thread of a server that runs OpenMP teams (`blocks.openmp`): the server's other
threads run torch serially. A second team, most likely formed by the event loop allocating the KV
pool, made GNU OpenMP stop spinning: on 2 cores, six layers of a 201 M model then took 23-27 ms per
token on the compute thread against 21-22 ms without it.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class ComputeThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
