"""Continuous batching: the pending steps of every session run as one forward per round.

A one-token step reads every weight of the span for one row; sixteen sessions' steps in one packed
forward read them once. Sessions join and leave between rounds. A round takes steps oldest first
while they fit in `max_batch_tokens` (rows × tokens); a prompt longer than that runs in chunks, one
per round, so it never holds the decoders up for more than one chunk. Each step keeps its own
positions, mask and cache (see `BlockSpan.forward_batch`), so its output is what it would be alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from blocks.span import BlockSpan, SpanInput
from protocol.pacing import Arrivals
from swarm.compute import ComputeThread

logger = logging.getLogger(__name__)

GATHER_MAX_SECONDS = 0.02  # the longest a round waits for the steps of sessions that are stepping now
ACTIVE_ROUNDS = 3  # a session whose last step came within this many rounds is stepping now
AFTER_ROUND_MAX_SECONDS = 0.5  # the longest background work waits for a round of the sessions stepping


@dataclass(eq=False)
class _Step:
    span: BlockSpan
    start: int
    end: int
    hidden: torch.Tensor
    cache: Any
    mask: Optional[torch.Tensor]
    future: asyncio.Future
    adapter: Any = None  # the session's LoRA adapter, if any
    done: int = 0  # tokens of this step already computed (a long prompt runs in chunks)
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]


class StepScheduler:
    def __init__(
        self, compute: ComputeThread, max_batch_tokens: int, on_round: Callable[[int], None] = lambda steps: None
    ):
        self.compute = compute
        self.max_batch_tokens = max_batch_tokens
        self.on_round = on_round  # told how many steps each round computed (a metric)
        self._pending: list[_Step] = []
        self._wake: Optional[asyncio.Event] = None
        self._driver: Optional[asyncio.Task] = None
        self._in_round: set[int] = set()  # ids of the steps the running round computes
        self._stepped = Arrivals(ACTIVE_ROUNDS)  # by each session's cache (its id)
        self._round_seconds = 0.0  # how long the last round took
        self._round_waiters: list[asyncio.Future] = []  # `after_round` callers

    @property
    def waiting(self) -> int:
        """Steps queued for a later round: the server's `num_requests_waiting`."""
        return sum(1 for step in self._pending if not step.future.done() and id(step) not in self._in_round)

    async def run(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        cache: Any,
        mask: Optional[torch.Tensor],
        start: int,
        end: int,
        adapter: Any = None,
    ) -> torch.Tensor:
        """Runs one session's step in the next round that has room for it (with its LoRA `adapter`, if
        any: steps of other adapters share the round); returns its output."""
        if self._driver is None or self._driver.done():
            self._wake = asyncio.Event()
            self._driver = asyncio.create_task(self._drive(), name="swarm-batching")
        step = _Step(span, start, end, hidden, cache, mask, asyncio.get_running_loop().create_future(), adapter)
        self._stepped.arrived(id(cache) if cache is not None else id(step), asyncio.get_running_loop().time())
        self._pending.append(step)
        self._wake.set()
        return await step.future

    @property
    def rounds(self) -> int:
        return self._stepped.batches

    @property
    def stepping(self) -> int:
        """Sessions whose steps a round may wait for: they stepped lately and have not closed."""
        return self._stepped.active()

    async def after_round(self, timeout: float = AFTER_ROUND_MAX_SECONDS) -> None:
        """Returns once the next round has run, at once if no session is stepping now (at most
        `timeout` seconds): background work (an import) lets the sessions decoding here go first."""
        if self._stepped.active() == 0 or self._driver is None or self._driver.done():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._round_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            if waiter in self._round_waiters:
                self._round_waiters.remove(waiter)

    def left(self, cache: Any) -> None:
        """The session of `cache` is over: no round waits for its steps."""
        self._stepped.left(id(cache))

    def close(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
        for step in self._pending:
            if not step.future.done():
                step.future.cancel()
        self._pending.clear()

    async def _drive(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._gather()
            while await self._one_round():
                await self._gather()

    async def _gather(self) -> None:
        """Before a round: while fewer steps wait than sessions are stepping now (their steps are on
        their way through the chain), waits a little for them, at most as long as the last round
        took and `GATHER_MAX_SECONDS`: sixteen sessions' steps arriving a millisecond apart then share
        one round (the weights read once) instead of spreading over many. A lone session never
        waits, nor do sessions for one that steps far less often or has closed. (Waiting longer, for
        steps due within half a round trip as the client's shared head does, gained nothing in the
        runs measured: the client's products already bring its sessions into step.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(GATHER_MAX_SECONDS, self._round_seconds)
        while True:
            pending = [step for step in self._pending if not step.future.done()]
            tokens = sum((step.tokens - step.done) * step.rows for step in pending)
            remaining = deadline - loop.time()
            stepping = self._stepped.active()
            if not pending or len(pending) >= stepping or tokens >= self.max_batch_tokens or remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _one_round(self) -> bool:
        """Runs the next round; False when nothing is pending. (Its own frame: nothing of a finished
        round, such as a retired span, stays referenced while the driver waits.)"""
        chosen = self._take_round()
        if not chosen:
            return False
        self._in_round = {id(step) for step, _ in chosen}
        started = asyncio.get_running_loop().time()
        try:
            results = await self.compute.run(_run_round, chosen)
        except Exception as e:  # _run_round answers per step; this is a failure of the thread itself
            results = [e] * len(chosen)
        finally:
            self._in_round = set()
            self._round_seconds = asyncio.get_running_loop().time() - started
        self._stepped.batch_ran()
        self.on_round(len(chosen))
        for (step, _), result in zip(chosen, results):
            self._finish_chunk(step, result)
        waiters, self._round_waiters = self._round_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def _take_round(self) -> list[tuple[_Step, int]]:
        """Oldest first, each step whole while it fits; only a step that fits in no round runs in chunks."""
        self._pending = [step for step in self._pending if not step.future.done()]
        budget = self.max_batch_tokens
        chosen: list[tuple[_Step, int]] = []
        for step in self._pending:
            remaining = step.tokens - step.done
            if remaining * step.rows <= budget:
                take = remaining
            elif not chosen:
                take = max(1, budget // step.rows)  # longer than a whole round: this round holds one chunk
            else:
                continue
            chosen.append((step, take))
            budget -= take * step.rows
            if budget <= 0:
                break
        taken = {id(step) for step, _ in chosen}
        # Steps still to finish go back in line after those that waited: chunks do not jump the queue.
        self._pending = [step for step in self._pending if id(step) not in taken] + [step for step, _ in chosen]
        return chosen

    def _finish_chunk(self, step: _Step, result: torch.Tensor | BaseException) -> None:
        if isinstance(result, BaseException):
            self._drop(step)
            if not step.future.done():
                step.future.set_exception(result)
            return
        step.outputs.append(result)
        step.done += result.shape[1]
        if step.done >= step.tokens:
            self._drop(step)
            if not step.future.done():
                step.future.set_result(step.outputs[0] if len(step.outputs) == 1 else torch.cat(step.outputs, dim=1))

    def _drop(self, step: _Step) -> None:
        try:
            self._pending.remove(step)
        except ValueError:
            pass


def _run_round(chosen: list[tuple[_Step, int]]) -> list[torch.Tensor | BaseException]:
    """Runs on the compute thread: one packed forward per (span, block range). If a batch fails, each
    of its steps runs again alone from where it began, so one step's failure is its own."""
    results: dict[int, torch.Tensor | BaseException] = {}
    groups: dict[tuple[int, int, int], list[tuple[_Step, int]]] = defaultdict(list)
    for step, take in chosen:
        groups[(id(step.span), step.start, step.end)].append((step, take))
    for group in groups.values():
        snapshots = [_lengths(step.cache) for step, _ in group]
        try:
            outputs = _forward(group)
        except Exception as e:
            if len(group) == 1 or any(snapshot is None for snapshot in snapshots):
                for step, _ in group:
                    results[id(step)] = e
                continue
            logger.warning(
                "a batch of %d steps failed (%s: %s); running them one by one", len(group), type(e).__name__, e
            )
            outputs = []
            for (step, take), snapshot in zip(group, snapshots):
                step.cache.restore(snapshot)
                try:
                    outputs.append(_forward([(step, take)])[0])
                except Exception as alone:
                    outputs.append(alone)
        for (step, _), output in zip(group, outputs):
            results[id(step)] = output
    return [results[id(step)] for step, _ in chosen]


def _forward(group: list[tuple[_Step, int]]) -> list[torch.Tensor]:
    span, start, end = group[0][0].span, group[0][0].start, group[0][0].end
    inputs = []
    for step, take in group:
        hidden = step.hidden if take == step.tokens else step.hidden[:, step.done : step.done + take]
        mask = step.mask
        if mask is not None and step.cache is not None:
            mask = mask[:, : span.cache_length(step.cache, start) + take]
        inputs.append(SpanInput(hidden, step.cache, mask, step.adapter))
    # To host here, on the compute thread, once the kernels are done: everything after (digests,
    # receipts, serialization, push) reads host memory and never waits on the device.
    return [output.cpu() for output in span.forward_batch(inputs, start, end)]


def _lengths(cache: Any) -> Optional[list[int]]:
    return cache.lengths() if hasattr(cache, "lengths") else None
