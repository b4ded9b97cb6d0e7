"""A single compute thread that owns all torch work, so the event loop never blocks on a matmul.

It is also the only thread of a server that runs OpenMP teams: every other thread calls
`serial_torch` first. GNU OpenMP stops spinning at its barriers once the teams of a process hold
more threads than there are CPUs, and then each product's worker goes to sleep after every product
and must be woken for the next one, dozens of times a step. A second team, formed by the event loop
allocating the KV pool or a bandwidth probe's payload, did that to the compute thread's products
on 2 cores: six layers of a 201 M model took 23-27 ms per token against 21-22 ms without it.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import glob
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)


class ComputeThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-compute")

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def serial_torch() -> None:
    """Makes torch run on the calling thread alone from now on: no OpenMP team of its own (see the
    module's docstring). Where torch does not bring GNU OpenMP (other builds), nothing changes."""
    import torch

    torch.get_num_threads()  # torch sets a thread's OpenMP thread count on its first use: before this
    library = _torch_libgomp()
    if library is not None:
        library.omp_set_num_threads(1)


@functools.cache
def _torch_libgomp() -> Optional[ctypes.CDLL]:
    """The GNU OpenMP that torch loaded (its wheels bring their own), not another copy."""
    import torch

    for path in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))):
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            logger.debug("cannot load %s: %s", path, e)
    return None
