"""The KV-cache budget: sessions reserve `batch × max_length` tokens of the span's KV pool up front and
always give them back."""

from __future__ import annotations

import logging
import threading
from typing import Optional

from blocks.kv_pool import KVPool, PoolFull, PooledCache
from blocks.wire import ErrorKind, WireError

logger = logging.getLogger(__name__)


class CacheBudget:
    """`total` tokens of KV cache; the memory itself is a `KVPool` for the span being served."""

    def __init__(self, total_tokens: int):
        self.total = total_tokens
        self._used = 0
        self._lock = threading.Lock()
        self._pool: Optional[KVPool] = None

    @property
    def free(self) -> int:
        return self.total - self._used

    @property
    def pool_bytes(self) -> int:
        return 0 if self._pool is None else self._pool.nbytes

    def bind(self, pool: KVPool) -> None:
        """Serves sessions from `pool` (`self.total` tokens, for the span being served)."""
        if pool.tokens != self.total:
            raise ValueError(f"a pool of {pool.tokens} tokens for a budget of {self.total}")
        self._pool = pool
        logger.info("KV pool: %d tokens × %d blocks, %.0f MiB", pool.tokens, pool.num_layers, pool.nbytes / 2**20)

    def unbind(self) -> None:
        """Drops the pool; every reservation must have been released first."""
        self._pool = None

    def reserve(self, batch: int, max_length: int) -> "Reservation":
        """Takes `batch × max_length` tokens and their slots in the pool, or refuses at once with a
        BUSY error (the client routes elsewhere)."""
        tokens = batch * max_length
        with self._lock:
            if tokens > self.total:
                raise WireError(ErrorKind.BAD_REQUEST, f"session needs {tokens} cache tokens, server has {self.total} in all")
            if tokens > self.total - self._used:
                raise WireError(ErrorKind.BUSY, f"cache full: {tokens} tokens asked, {self.total - self._used} free")
            if self._pool is None:
                raise WireError(ErrorKind.BUSY, "server is moving to other blocks")
            try:
                cache = self._pool.allocate(batch, max_length)
            except PoolFull:
                raise WireError(ErrorKind.BUSY, f"cache fragmented: {tokens} contiguous tokens asked, "
                                                f"{self._pool.largest_free_run()} in the longest free run") from None
            self._used += tokens
        return Reservation(self, tokens, cache)

    def _release(self, tokens: int) -> None:
        with self._lock:
            self._used -= tokens


class Reservation:
    """A session's cache; released exactly once, however many times `release()` is called."""

    def __init__(self, budget: CacheBudget, tokens: int, cache: PooledCache):
        self._budget = budget
        self.tokens = tokens
        self.cache = cache
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.cache.release()
            self._budget._release(self.tokens)
