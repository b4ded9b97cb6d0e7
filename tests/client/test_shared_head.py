"""The client's shared LM head: concurrent generations' rows share one product."""

from __future__ import annotations

import asyncio
import threading

import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_head
from client.shared_head import SharedHead
from tests.helpers.models import ATOL


async def test_concurrent_lm_head_calls_of_one_client_share_one_product(llama_path):
    real = load_head(Checkpoint(llama_path))
    started, release = threading.Event(), threading.Event()

    class FirstCallWaits:
        """The real head, whose first call waits until the others have queued behind it."""

        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            if len(self.calls) == 1:
                started.set()
                release.wait(timeout=30)
            return real.logits(hidden)

    head = SharedHead(FirstCallWaits())
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randn(n, real.lm_head.in_features, generator=generator) for n in (1, 2, 1, 3)]
    try:
        first = asyncio.create_task(head.alogits(rows[0], "g0"))
        assert await asyncio.to_thread(started.wait, 30)
        others = [asyncio.create_task(head.alogits(rows[i], f"g{i}")) for i in range(1, len(rows))]
        await asyncio.sleep(0)
        assert head.queued() == [2, 1, 3]  # behind the running product
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *others), 30)
    finally:
        release.set()
        head.close()
    assert FirstCallWaits.calls == [1, 6]  # the three callers that queued went together
    assert (head.products, head.rows) == (2, 7)  # what bench/concurrency.py reports
    for hidden, got in zip(rows, results):
        torch.testing.assert_close(got, real.logits(hidden), atol=ATOL, rtol=0)


async def test_a_product_waits_briefly_for_the_rows_of_a_generation_running_now(llama_path, monkeypatch):
    """Two generations ask for logits in turn, the second a moment after the first: the product waits
    for its rows (at most as long as the last product took) and computes both at once."""
    from client import shared_head

    monkeypatch.setattr(shared_head, "GATHER_MAX_SECONDS", 5.0)
    real = load_head(Checkpoint(llama_path))

    class SlowHead:
        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            threading.Event().wait(0.3)
            return real.logits(hidden)

    head = SharedHead(SlowHead())
    row = torch.randn(1, real.lm_head.in_features, generator=torch.Generator().manual_seed(5))

    async def generation(name: str, delay: float) -> None:
        for _ in range(2):
            await asyncio.sleep(delay)
            torch.testing.assert_close(await head.alogits(row, name), real.logits(row), atol=ATOL, rtol=0)

    try:
        await asyncio.wait_for(asyncio.gather(generation("a", 0.0), generation("b", 0.05)), 60)
    finally:
        head.close()
    assert 2 in SlowHead.calls  # the second generation's row waited for the first one's next row


async def test_generations_out_of_step_fall_into_one_product_once_their_round_trips_are_known(llama_path, monkeypatch):
    """The second generation starts 0.15 s after the first, each 0.6 s of chain away from its next
    rows: a product waits for rows due within half a round trip, and from then on both share it.
    (With 0.4 s a product waits at most 0.1 s past a row's due time, and a full run on the loaded
    2-core machine once had one product of one row after the two were in step.)"""
    from client import shared_head

    monkeypatch.setattr(shared_head, "GATHER_MAX_SECONDS", 5.0)
    real = load_head(Checkpoint(llama_path))

    class CountingHead:
        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            return real.logits(hidden)

    head = SharedHead(CountingHead())
    row = torch.randn(1, real.lm_head.in_features, generator=torch.Generator().manual_seed(6))

    async def generation(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        for _ in range(5):
            torch.testing.assert_close(await head.alogits(row, name), real.logits(row), atol=ATOL, rtol=0)
            await asyncio.sleep(0.6)  # the chain's round trip
        head.leave(name)

    try:
        await asyncio.wait_for(asyncio.gather(generation("a", 0.0), generation("b", 0.15)), 60)
    finally:
        head.close()
    assert CountingHead.calls[:2] == [1, 1]  # out of step, round trips not known yet
    assert CountingHead.calls[-2:] == [2, 2]  # in step: one product per token for both
    assert head.generating() == 0


async def test_a_finished_generation_is_not_waited_for(llama_path, monkeypatch):
    """A product waits for the rows of a generation running now (here: as long as the last product
    took, 1.5 s, since no round trip is known yet), but not once that generation has left."""
    from client import shared_head

    monkeypatch.setattr(shared_head, "GATHER_MAX_SECONDS", 30.0)
    monkeypatch.setattr(shared_head, "GATHER_UNKNOWN_SECONDS", 30.0)
    real = load_head(Checkpoint(llama_path))

    class FirstProductsSlow:
        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            if len(self.calls) <= 2:
                threading.Event().wait(1.5)
            return real.logits(hidden)

    head = SharedHead(FirstProductsSlow())
    row = torch.randn(1, real.lm_head.in_features, generator=torch.Generator().manual_seed(7))
    try:
        await asyncio.gather(head.alogits(row, "a"), head.alogits(row, "b"))
        assert head.generating() == 2
        waiting = asyncio.create_task(head.alogits(row, "a"))  # its product waits for b's row ...
        await asyncio.sleep(0.2)
        assert head.queued() == [1]
        head.leave("b")  # ... until b leaves
        assert head.queued() == []  # the product started
        await asyncio.wait_for(waiting, 10)
        head.leave("a")
    finally:
        head.close()
    assert FirstProductsSlow.calls == [1, 1, 1]  # a's first row went alone: b was not generating yet
    assert head.generating() == 0


async def test_every_product_runs_on_the_heads_own_thread_never_a_callers(llama_path):
    """GNU OpenMP gives each thread that runs a parallel product a team of its own: products run by
    the callers (the event loop's thread, or the threads of the client's API) would leave one team each."""
    real = load_head(Checkpoint(llama_path))

    class Recording:
        threads: set[int] = set()

        def logits(self, hidden):
            self.threads.add(threading.get_ident())
            return real.logits(hidden)

    head = SharedHead(Recording())
    width = real.lm_head.in_features
    callers = {threading.get_ident()}
    try:
        await asyncio.gather(
            *(head.alogits(torch.randn(1, width), index) for index in range(4)),
            head.alogits(torch.randn(1, 3, width), "prompt"),  # a whole prompt's rows
        )

        def call() -> None:
            callers.add(threading.get_ident())
            head.logits(torch.randn(1, 2, width))  # a forward pass through the client's API

        await asyncio.to_thread(call)
    finally:
        head.close()
    assert len(Recording.threads) == 1 and not Recording.threads & callers
