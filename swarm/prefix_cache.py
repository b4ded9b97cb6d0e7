"""The prefix cache: finished sessions' prompt KV kept in the KV pool, for later prompts that start the same.

A prompt is cut into blocks of `BLOCK_TOKENS` token ids. Each block's key is a hash chain: SHA-256 of
the previous block's key and the block's ids, rooted in what else the KV depends on (the model, the
blocks of the session, the dtype) and in who may reuse it (the peer that computed it: a stranger
could otherwise plant KV computed from other inputs under a prompt's ids). A block's KV is a *page*
of the pool, `BLOCK_TOKENS` tokens long, owned by the cache; a new session copies the pages of its
longest cached prefix into its own slice and computes only the rest.

Pages yield to live sessions: when a session's slice does not fit, the least recently used pages
go back to the pool first (the deepest block of a prefix before its parents, so what is left of a
prefix stays usable). A page being copied is pinned and goes back only once the copy is done.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from blocks.kv_pool import KVPool
from protocol.messages import PREFIX_BLOCK_TOKENS as BLOCK_TOKENS

logger = logging.getLogger(__name__)


def prefix_root(model: str, start: int, end: int, dtype: str, scope: str) -> bytes:
    """What a prefix's KV depends on besides its ids, and who may reuse it."""
    return hashlib.sha256(f"swarm-prefix\0{model}\0{start}:{end}\0{dtype}\0{scope}".encode()).digest()


def block_keys(root: bytes, ids: Sequence[int]) -> list[bytes]:
    """The key of every full block of `ids`, each covering all the ids before it."""
    keys, key = [], root
    for offset in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        block = b"".join(int(token).to_bytes(4, "little") for token in ids[offset : offset + BLOCK_TOKENS])
        key = hashlib.sha256(key + block).digest()
        keys.append(key)
    return keys


@dataclass(eq=False)
class Page:
    start: int  # first pool token
    depth: int  # which block of its prefix (0: the first)
    used: int  # when it was last matched or stored (a counter, for LRU)
    pins: int = 0
    evicted: bool = False


class PrefixCache:
    """Pages of the KV pool, by block key, within `max_tokens`."""

    def __init__(self, pool: KVPool, max_tokens: int, on_evict: Optional[Callable[[bytes, torch.Tensor], None]] = None):
        self.pool = pool
        self.max_tokens = max_tokens
        # told each page that leaves the pool: its key and a copy of its KV [layers, 2, kv_heads, tokens, head_dim]
        self.on_evict = on_evict
        self._pages: dict[bytes, Page] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def tokens(self) -> int:
        """Pool tokens the cache holds."""
        with self._lock:
            return len(self._pages) * BLOCK_TOKENS

    @property
    def evictable(self) -> int:
        """Pool tokens that a live session could take back now (those of pages not being copied)."""
        with self._lock:
            return sum(BLOCK_TOKENS for page in self._pages.values() if not page.pins)

    def match(self, keys: Sequence[bytes]) -> list[Page]:
        """The pages of the longest cached prefix of `keys`, pinned (call `unpin` once they are copied)."""
        with self._lock:
            now = next(self._clock)
            pages = []
            for key in keys:
                page = self._pages.get(key)
                if page is None:
                    break
                page.used, page.pins = now, page.pins + 1
                pages.append(page)
            return pages

    def unpin(self, pages: Sequence[Page]) -> None:
        with self._lock:
            for page in pages:
                page.pins -= 1
                if page.evicted and not page.pins:
                    self.pool.give_back(page.start, BLOCK_TOKENS)

    def store(self, keys: Sequence[bytes], start: int) -> None:
        """Takes pool tokens [start, start + len(keys) × BLOCK_TOKENS), a finished session's first blocks
        (their KV in order): blocks not cached yet become pages, the others go back to the pool."""
        with self._lock:
            now = next(self._clock)
            for depth, key in enumerate(keys):
                offset = start + depth * BLOCK_TOKENS
                page = self._pages.get(key)
                if page is not None:
                    page.used = now
                    self.pool.give_back(offset, BLOCK_TOKENS)
                else:
                    self._pages[key] = Page(offset, depth, now)
            over = len(self._pages) * BLOCK_TOKENS - self.max_tokens
        if over > 0:
            self.evict(over)

    def evict(self, tokens: int) -> int:
        """Gives at least `tokens` pool tokens back, least recently used pages first; returns how many."""
        return self._evict_until(lambda freed: freed >= tokens)

    def make_room(self, contiguous: int) -> bool:
        """Evicts pages, least recently used first, until the pool has a free run of `contiguous`
        tokens; False if even an empty cache would not make one."""
        self._evict_until(lambda freed: self.pool.largest_free_run() >= contiguous)
        return self.pool.largest_free_run() >= contiguous

    def spill_all(self) -> int:
        """Hands a copy of every page to `on_evict` (they also stay here); returns how many."""
        with self._lock:
            for key, page in self._pages.items():
                self._spill(key, page)
            return len(self._pages) if self.on_evict is not None else 0

    def _spill(self, key: bytes, page: Page) -> None:
        if self.on_evict is not None:
            self.on_evict(key, self.pool.storage[:, :, :, page.start : page.start + BLOCK_TOKENS].to("cpu", copy=True))

    def _evict_until(self, done: Callable[[int], bool]) -> int:
        freed = 0
        with self._lock:
            order = sorted(self._pages.items(), key=lambda item: (item[1].used, -item[1].depth))
            for key, page in order:
                if done(freed):
                    break
                del self._pages[key]
                page.evicted = True
                self._spill(key, page)
                if not page.pins:
                    self.pool.give_back(page.start, BLOCK_TOKENS)
                freed += BLOCK_TOKENS
        if freed:
            logger.debug("prefix cache: %d tokens given back to live sessions", freed)
        return freed
