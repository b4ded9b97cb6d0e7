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
    for hidden, got in zip(rows, results):
        torch.testing.assert_close(got, real.logits(hidden), atol=ATOL, rtol=0)
