"""The KV-cache budget: sessions reserve `batch × max_length` tokens of the span's KV pool up front and
always give them back; what the prefix cache keeps of finished prompts yields to them."""

from __future__ import annotations

import logging
from typing import Optional

from blocks.kv_pool import KVPool, PooledCache, PoolFull
from protocol.errors import ErrorKind, WireError
from swarm.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class CacheBudget:
    """`total` tokens of KV cache; the memory itself is a `KVPool` for the span being served, and what
    is free is what the pool has not handed out."""

    def __init__(self, total_tokens: int, prefix_tokens: int = 0):
        self.total = total_tokens
        self.prefix_tokens = prefix_tokens  # most tokens the prefix cache may keep (0: it keeps none)
        self._pool: Optional[KVPool] = None
        self.prefixes: Optional[PrefixCache] = None
        self.on_evict = None  # where a prefix page leaving the pool goes (`PrefixCache.on_evict`), if anywhere

    @property
    def free(self) -> int:
        """Tokens a new session could have: those no session holds (cached prefixes yield to it)."""
        if self._pool is None:
            return self.total
        return self._pool.free + (self.prefixes.evictable if self.prefixes is not None else 0)

    def bind(self, pool: KVPool) -> None:
        """Serves sessions from `pool` (`self.total` tokens, for the span being served)."""
        if pool.tokens != self.total:
            raise ValueError(f"a pool of {pool.tokens} tokens for a budget of {self.total}")
        self._pool = pool
        self.prefixes = PrefixCache(pool, self.prefix_tokens, self.on_evict) if self.prefix_tokens else None
        logger.info("KV pool: %d tokens × %d blocks, %.0f MiB", pool.tokens, pool.num_layers, pool.nbytes / 2**20)

    def unbind(self) -> None:
        """Drops the pool (and the prefixes kept in it); every session's cache must have been released first."""
        self._pool = None
        self.prefixes = None

    def reserve(self, batch: int, max_length: int) -> PooledCache:
        """A session's cache of `batch × max_length` tokens in the pool (give it back with its
        `release()`), or a BUSY error at once (the client routes elsewhere)."""
        tokens = batch * max_length
        if tokens > self.total:
            raise WireError(
                ErrorKind.BAD_REQUEST, f"session needs {tokens} cache tokens, server has {self.total} in all"
            )
        pool = self._pool
        if pool is None:
            raise WireError(ErrorKind.BUSY, "server is moving to other blocks")
        try:
            return pool.allocate(batch, max_length)
        except PoolFull:
            if self.prefixes is not None and self.prefixes.make_room(tokens):
                return pool.allocate(batch, max_length)
            free = pool.free
            if tokens > free:
                raise WireError(ErrorKind.BUSY, f"cache full: {tokens} tokens asked, {free} free") from None
            raise WireError(
                ErrorKind.BUSY,
                f"cache fragmented: {tokens} contiguous tokens asked, "
                f"{pool.largest_free_run()} in the longest free run",
            ) from None
