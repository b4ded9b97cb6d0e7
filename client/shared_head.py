"""The LM head shared by every generation of one client: concurrent calls run as one matrix product.

A one-row LM head reads the whole vocabulary matrix (on a 32k × 768 head, 98 MB for every token of
every session); when the relay or an application runs many generations at once in one client, the
rows queued while one product runs go together in the next one. A product also waits for the rows of
generations that are running now but not queued yet, while they are due soon (`protocol.pacing`; at
most `GATHER_MAX_SECONDS`, and a short while before any round trip is known): generations that
started out of step fall into one product per token instead of two. A lone generation never waits,
and a finished one (`leave`) is not waited for.

Generations ask for their rows' logits on the client's event loop (`alogits`), where every
generation of the client runs. Every product runs on one thread of the head's own. GNU OpenMP gives
each thread that runs a parallel product a team of its own, and stops spinning at its barriers once a
process's teams hold more threads than there are CPUs: products run by whichever caller gathered the
rows left one team per generation thread (sixteen, with sixteen generations), and every product's
workers slept and were woken between its steps.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Hashable, Optional

import torch

from blocks.loading import ModelHead
from protocol.pacing import Arrivals

GATHER_MAX_SECONDS = 0.25  # the longest a product waits for rows due from generations running now
GATHER_UNKNOWN_SECONDS = 0.02  # ... for rows of generations whose round trip is not known yet
ACTIVE_PRODUCTS = 3  # a caller whose last rows came within this many products is generating now


class _Request:
    __slots__ = ("hidden", "caller", "device", "future")

    def __init__(self, hidden: torch.Tensor, caller: Hashable, device, future: asyncio.Future):
        self.hidden, self.caller, self.device, self.future = hidden, caller, device, future


class SharedHead:
    """`embed_tokens` and `logits` of a `ModelHead`; `alogits` combines concurrent generations' rows.
    Its gathering state belongs to the one event loop its generations run on."""

    def __init__(self, head: ModelHead):
        self.head = head
        self._queue: list[_Request] = []
        self._running = False
        self._timer: Optional[asyncio.TimerHandle] = None
        self._callers = Arrivals(ACTIVE_PRODUCTS)
        self._product_seconds = 0.0  # how long the last product took
        self.products = 0  # products run so far, and the rows they computed (one-row calls batched)
        self.rows = 0
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="lm-head")

    def close(self) -> None:
        """Lets the product thread go (a product still running finishes)."""
        self._compute.shutdown(wait=False)

    def generating(self) -> int:
        """Generations that asked for logits lately and have not left."""
        return self._callers.active()

    def leave(self, caller: Hashable) -> None:
        """Generation `caller` is over: no product waits for its rows any more."""
        self._callers.left(caller)
        self._consider()

    def queued(self) -> list[int]:
        """Rows of each call waiting for the next product."""
        return [request.hidden.shape[0] for request in self._queue]

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `hidden`, on their own (from any thread but the loop's)."""
        return self._compute.submit(self.head.logits, hidden).result()

    async def alogits(self, hidden: torch.Tensor, caller: Hashable, device=None) -> torch.Tensor:
        """Logits of `hidden` on `device` (None: the head's) for generation `caller`: [rows, hidden_size]
        rows are combined with other generations', anything else (a whole prompt's positions) runs on
        its own."""
        if hidden.ndim != 2:
            return await asyncio.wrap_future(self._compute.submit(self._alone, hidden, device))
        request = _Request(hidden, caller, device, asyncio.get_running_loop().create_future())
        self._callers.arrived(caller, time.monotonic())
        self._queue.append(request)
        self._consider()
        return await request.future

    def _alone(self, hidden: torch.Tensor, device) -> torch.Tensor:
        logits = self.head.logits(hidden)
        return logits if device is None else logits.to(device)

    def _consider(self) -> None:
        """Starts a product of the queued rows once every generation running now has queued its own,
        or once those due soon are due (see the module's docstring)."""
        if self._running or not self._queue:
            return
        if len(self._queue) >= self._callers.active():
            self._start()
        elif self._timer is None:
            now = time.monotonic()
            deadline = self._callers.deadline(
                now,
                (request.caller for request in self._queue),
                min(GATHER_UNKNOWN_SECONDS, self._product_seconds),
                GATHER_MAX_SECONDS,
            )
            if deadline <= now:
                self._start()
            else:
                self._timer = asyncio.get_running_loop().call_later(deadline - now, self._start)

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = [request for request in self._queue if not request.future.done()]  # not cancelled
        self._queue = []
        if not batch:
            return
        self._running = True
        started = time.monotonic()
        product = asyncio.wrap_future(self._compute.submit(self._product, batch))
        product.add_done_callback(lambda done: self._finished(batch, done, started))

    def _product(self, batch: list[_Request]) -> list[torch.Tensor]:
        """Every request's logits, from one product (on the head's thread)."""
        rows = [request.hidden for request in batch]
        logits = self.head.logits(rows[0] if len(rows) == 1 else torch.cat(rows))
        results, offset = [], 0
        for request in batch:
            mine = logits[offset : offset + request.hidden.shape[0]]
            results.append(mine if request.device is None else mine.to(request.device))
            offset += request.hidden.shape[0]
        return results

    def _finished(self, batch: list[_Request], done: asyncio.Future, started: float) -> None:
        self._running = False
        self._callers.batch_ran()
        self.products += 1
        self.rows += sum(request.hidden.shape[0] for request in batch)
        self._product_seconds = time.monotonic() - started
        for index, request in enumerate(batch):
            if request.future.done():
                continue
            if done.cancelled():  # the head was closed
                request.future.cancel()
            elif done.exception() is not None:
                request.future.set_exception(done.exception())
            else:
                request.future.set_result(done.result()[index])
        self._consider()
