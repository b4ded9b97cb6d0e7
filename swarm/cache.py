"""The KV-cache budget: sessions reserve `batch × max_length` tokens up front and always give them back."""

from __future__ import annotations

import logging
import threading

from blocks.wire import ErrorKind, WireError

logger = logging.getLogger(__name__)


class CacheBudget:
    def __init__(self, total_tokens: int):
        self.total = total_tokens
        self._used = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return self.total - self._used

    def reserve(self, tokens: int) -> "Reservation":
        """Takes `tokens` from the budget or refuses at once with a BUSY error (the client routes elsewhere)."""
        with self._lock:
            if tokens > self.total:
                raise WireError(ErrorKind.BAD_REQUEST, f"session needs {tokens} cache tokens, server has {self.total} in all")
            if tokens > self.total - self._used:
                raise WireError(ErrorKind.BUSY, f"cache full: {tokens} tokens asked, {self.total - self._used} free")
            self._used += tokens
        return Reservation(self, tokens)

    def _release(self, tokens: int) -> None:
        with self._lock:
            self._used -= tokens


class Reservation:
    """Released exactly once, however many times `release()` is called."""

    def __init__(self, budget: CacheBudget, tokens: int):
        self._budget = budget
        self.tokens = tokens
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._budget._release(self.tokens)
