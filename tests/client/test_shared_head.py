"""The client's shared LM head: concurrent calls share one product."""

from __future__ import annotations

import threading
import time

import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_head
from client.shared_head import SharedHead
from tests.helpers.models import ATOL


def test_concurrent_lm_head_calls_of_one_client_share_one_product(llama_path):
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
    results: list = [None] * len(rows)

    def call(index):
        results[index] = head.logits(rows[index])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(timeout=30)
    others = [threading.Thread(target=call, args=(index,)) for index in range(1, len(rows))]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 30
    while len(head.queued()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(timeout=30)
    assert FirstCallWaits.calls == [1, 6]  # the three callers that queued went together
    assert (head.products, head.rows) == (2, 7)  # what bench/concurrency.py reports
    for hidden, got in zip(rows, results):
        torch.testing.assert_close(got, real.logits(hidden), atol=ATOL, rtol=0)


def test_a_product_waits_briefly_for_the_rows_of_a_generation_running_now(llama_path, monkeypatch):
    """Two generations ask for logits in turn, the second a moment after the first: the product waits
    for its rows (at most as long as the last product took) and computes both at once."""
    from client import shared_head

    monkeypatch.setattr(shared_head, "GATHER_MAX_SECONDS", 5.0)
    real = load_head(Checkpoint(llama_path))

    class SlowHead:
        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            time.sleep(0.3)
            return real.logits(hidden)

    head = SharedHead(SlowHead())
    row = torch.randn(1, real.lm_head.in_features, generator=torch.Generator().manual_seed(5))

    def generation(delay: float) -> None:
        for _ in range(2):
            time.sleep(delay)
            torch.testing.assert_close(head.logits(row), real.logits(row), atol=ATOL, rtol=0)

    threads = [threading.Thread(target=generation, args=(delay,)) for delay in (0.0, 0.05)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert 2 in SlowHead.calls  # the second generation's row waited for the first one's next row


def test_generations_out_of_step_fall_into_one_product_once_their_round_trips_are_known(llama_path, monkeypatch):
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

    def generation(delay: float) -> None:
        time.sleep(delay)
        for _ in range(5):
            torch.testing.assert_close(head.logits(row), real.logits(row), atol=ATOL, rtol=0)
            time.sleep(0.6)  # the chain's round trip
        head.leave()

    threads = [threading.Thread(target=generation, args=(delay,)) for delay in (0.0, 0.15)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert CountingHead.calls[:2] == [1, 1]  # out of step, round trips not known yet
    assert CountingHead.calls[-2:] == [2, 2]  # in step: one product per token for both
    assert head.generating() == 0


def test_a_finished_generation_is_not_waited_for(llama_path):
    real = load_head(Checkpoint(llama_path))
    head = SharedHead(real)
    row = torch.randn(1, real.lm_head.in_features, generator=torch.Generator().manual_seed(7))
    first_done, counts = threading.Event(), []

    def first() -> None:
        head.logits(row)
        head.leave()  # what decode does at its end
        first_done.set()

    thread = threading.Thread(target=first)
    head.logits(row)
    thread.start()
    assert first_done.wait(timeout=30)
    counts.append(head.generating())  # this thread only: the other one left
    head.logits(row)
    head.leave()
    counts.append(head.generating())
    thread.join(timeout=30)
    assert counts == [1, 0]


def test_every_product_runs_on_the_heads_own_thread_never_a_callers(llama_path):
    """GNU OpenMP gives each thread that runs a parallel product a team of its own: products run by
    the callers would leave one team per generation thread."""
    real = load_head(Checkpoint(llama_path))

    class Recording:
        threads: set[int] = set()

        def logits(self, hidden):
            self.threads.add(threading.get_ident())
            return real.logits(hidden)

    head = SharedHead(Recording())
    callers: set[int] = set()
    width = real.lm_head.in_features

    def call(hidden):
        callers.add(threading.get_ident())
        head.logits(hidden)

    try:
        threads = [threading.Thread(target=call, args=(torch.randn(1, width),)) for _ in range(4)]
        threads.append(threading.Thread(target=call, args=(torch.randn(1, 3, width),)))  # a whole prompt's rows
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        call(torch.randn(2, width))
    finally:
        head.close()
    assert len(Recording.threads) == 1 and not Recording.threads & callers
