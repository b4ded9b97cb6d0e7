"""The LM head shared by every generation of one client: concurrent calls run as one matrix product.

A one-row LM head reads the whole vocabulary matrix (on a 32k × 768 head, 98 MB for every token of
every session); when the relay or an application runs many generations as threads of one client, the
rows queued while one product runs go together in the next one. A product also waits for the rows of
generations that are running now but not queued yet, while they are due soon (`protocol.pacing`; at
most `GATHER_MAX_SECONDS`, and a short while before any round trip is known): generations that
started out of step fall into one product per token instead of two. A lone generation never waits,
and a finished one (`leave`) is not waited for.

Every product runs on one thread of the head's own. GNU OpenMP gives each thread that runs a
parallel product a team of its own, and stops spinning at its barriers once a process's teams hold
more threads than there are CPUs: products run by whichever caller gathered the rows left one team
per generation thread (sixteen, with sixteen generations), and every product's workers slept and
were woken between its steps.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from blocks.loading import ModelHead
from protocol.pacing import Arrivals

GATHER_MAX_SECONDS = 0.25  # the longest a product waits for rows due from generations running now
GATHER_UNKNOWN_SECONDS = 0.02  # ... for rows of generations whose round trip is not known yet
ACTIVE_PRODUCTS = 3  # a caller whose last rows came within this many products is generating now


class _Request:
    __slots__ = ("hidden", "caller", "logits", "error")

    def __init__(self, hidden: torch.Tensor, caller: int):
        self.hidden, self.caller = hidden, caller
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None


class SharedHead:
    """`embed_tokens` and `logits` of a `ModelHead`; `logits` combines concurrent callers' rows."""

    def __init__(self, head: ModelHead):
        self.head = head
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._running = False
        self._callers = Arrivals(ACTIVE_PRODUCTS)  # by thread id
        self._product_seconds = 0.0  # how long the last product took
        self.products = 0  # products run so far, and the rows they computed (one-row calls batched)
        self.rows = 0
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="lm-head")

    def close(self) -> None:
        """Lets the product thread go (a product still running finishes)."""
        self._compute.shutdown(wait=False)

    def _product(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._compute.submit(self.head.logits, hidden).result()

    def generating(self) -> int:
        """Generations that asked for logits lately and have not left."""
        with self._cond:
            return self._callers.active()

    def leave(self) -> None:
        """The calling thread's generation is over: no product waits for its rows any more."""
        with self._cond:
            self._callers.left(threading.get_ident())
            self._cond.notify_all()

    def queued(self) -> list[int]:
        """Rows of each call waiting for the next product."""
        with self._cond:
            return [request.hidden.shape[0] for request in self._queue]

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of `hidden`: [rows, hidden_size] rows are combined with other callers', anything else
        (a whole prompt's positions) runs on its own."""
        if hidden.ndim != 2:
            return self._product(hidden)
        me, now = threading.get_ident(), time.monotonic()
        request = _Request(hidden, me)
        with self._cond:
            self._callers.arrived(me, now)
            self._queue.append(request)
            self._cond.notify_all()  # a product gathering rows hears of these
            while request.logits is None and request.error is None and self._running:
                self._cond.wait()
            if request.logits is None and request.error is None:
                # Nobody is computing: this caller runs everything queued, its own rows included,
                # once the generations running now have queued theirs (or a short wait is over).
                self._running = True
                self._gather()
                batch, self._queue = self._queue, []
        if request.logits is None and request.error is None:
            self._run(batch)
        if request.error is not None:
            raise request.error
        return request.logits

    def _gather(self) -> None:
        """Waits (holding the condition) while fewer callers are queued than are generating now, until
        the rows of those due soon are due (see the module's docstring)."""
        deadline = self._callers.deadline(
            time.monotonic(),
            (request.caller for request in self._queue),
            min(GATHER_UNKNOWN_SECONDS, self._product_seconds),
            GATHER_MAX_SECONDS,
        )
        while len(self._queue) < self._callers.active():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _run(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        try:
            rows = [request.hidden for request in batch]
            logits = self._product(rows[0] if len(rows) == 1 else torch.cat(rows))
            offset = 0
            for request in batch:
                request.logits = logits[offset : offset + request.hidden.shape[0]]
                offset += request.hidden.shape[0]
        except BaseException as e:
            for request in batch:
                request.error = e
        finally:
            with self._cond:
                self._running = False
                self._callers.batch_ran()
                self.products += 1
                self.rows += sum(request.hidden.shape[0] for request in batch)
                self._product_seconds = time.monotonic() - started
                self._cond.notify_all()
