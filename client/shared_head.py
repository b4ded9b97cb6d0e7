"""The LM head shared by every generation of one client: concurrent calls run as one matrix product.

A one-row LM head reads the whole vocabulary matrix (on a 32k × 768 head, 98 MB for every token of
every session); when the relay or an application runs many generations as threads of one client, the
rows queued while one product runs go together in the next one. A lone generation never waits.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from blocks.loading import ModelHead


class _Request:
    __slots__ = ("hidden", "logits", "error")

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None


class SharedHead:
    """`embed_tokens` and `logits` of a `ModelHead`; `logits` combines concurrent callers' rows."""

    def __init__(self, head: ModelHead):
        self.head = head
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._running = False

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
            return self.head.logits(hidden)
        request = _Request(hidden)
        with self._cond:
            self._queue.append(request)
            while request.logits is None and request.error is None and self._running:
                self._cond.wait()
            if request.logits is None and request.error is None:
                # Nobody is computing: this caller runs everything queued, its own rows included.
                self._running = True
                batch, self._queue = self._queue, []
        if request.logits is None and request.error is None:
            self._run(batch)
        if request.error is not None:
            raise request.error
        return request.logits

    def _run(self, batch: list[_Request]) -> None:
        try:
            rows = [request.hidden for request in batch]
            logits = self.head.logits(rows[0] if len(rows) == 1 else torch.cat(rows))
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
                self._cond.notify_all()
