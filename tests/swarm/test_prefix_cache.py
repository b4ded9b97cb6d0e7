"""The prefix cache's pages in a real KV pool: keys that cover model, blocks, dtype and client;
least recently used first, the deepest block first; pinned pages kept until copied; live sessions win."""

from __future__ import annotations

import torch

from blocks.kv_pool import KVPool
from swarm.cache import CacheBudget
from swarm.prefix_cache import BLOCK_TOKENS, PrefixCache, block_keys, prefix_root


def test_keys_cover_everything_the_kv_depends_on_and_who_may_reuse_it():
    ids = list(range(40))
    root = prefix_root("m", 0, 4, "float32", "client-a")
    keys = block_keys(root, ids)
    assert len(keys) == 2 and block_keys(root, ids[:32]) == keys  # a partial block has no key
    others = [
        prefix_root("other-model", 0, 4, "float32", "client-a"),
        prefix_root("m", 0, 3, "float32", "client-a"),
        prefix_root("m", 0, 4, "bfloat16", "client-a"),
        prefix_root("m", 0, 4, "float32", "client-b"),
    ]
    for other in others:
        assert not set(block_keys(other, ids)) & set(keys)
    changed = block_keys(root, [7] + ids[1:])
    assert changed[0] != keys[0] and changed[1] != keys[1]  # a block's key covers every id before it


def pool_and_cache(tokens=128, max_tokens=128):
    pool = KVPool(num_layers=2, kv_heads=1, head_dim=2, tokens=tokens, dtype=torch.float32, device="cpu")
    return pool, PrefixCache(pool, max_tokens)


def test_pages_are_evicted_oldest_first_deepest_first_and_a_pinned_page_only_once_copied():
    pool, cache = pool_and_cache()
    keys = block_keys(prefix_root("m", 0, 2, "float32", "p"), list(range(48)))
    cache.store(keys, pool.allocate(1, 64).release(keep=48))
    assert pool.free == 128 - 48 and cache.tokens == 48
    copying = cache.match(keys)  # a new session copies all three pages
    assert len(copying) == 3 and cache.evictable == 0
    cache.evict(16)
    assert cache.tokens == 32 and pool.free == 128 - 48  # the deepest page went, but its copy is not done
    cache.unpin(copying)
    assert pool.free == 128 - 32 and cache.evictable == 32
    cache.unpin(cache.match(keys[:1]))  # block 0 used again: block 1 is now the least recently used
    cache.evict(16)
    pages = cache.match(keys)
    assert [page.depth for page in pages] == [0] and pool.free == 128 - 16
    cache.unpin(pages)


def test_a_live_session_takes_back_what_the_prefix_cache_holds():
    budget = CacheBudget(128, prefix_tokens=128)
    budget.bind(KVPool(2, 1, 2, 128, torch.float32, "cpu"))
    keys = block_keys(prefix_root("m", 0, 2, "float32", "p"), list(range(64)))
    first = budget.reserve(1, 100)
    budget.prefixes.store(keys, first.release(keep=64))
    assert budget.free == 128  # cached pages count as free: they yield
    second = budget.reserve(1, 128)  # needs every token: the cache gives its pages back
    assert budget.prefixes.tokens == 0
    second.release()
    assert budget.free == 128


def test_the_cache_keeps_at_most_its_size_and_copies_pages_into_a_new_session():
    pool, cache = pool_and_cache(max_tokens=32)
    keys = block_keys(prefix_root("m", 0, 2, "float32", "p"), list(range(48)))
    session = pool.allocate(1, 48)
    written = torch.randn(1, 1, 48, 2)
    for layer in range(2):
        session.update(layer, written, -written)
    cache.store(keys, session.release(keep=48))
    assert cache.tokens == 32 and pool.free == 128 - 32
    pages = cache.match(keys)
    assert len(pages) == 2
    reused = pool.allocate(1, 40)
    reused.fill(torch.cat([torch.arange(page.start, page.start + BLOCK_TOKENS) for page in pages]))
    cache.unpin(pages)
    assert reused.lengths() == [32, 32]
    more = torch.randn(1, 1, 1, 2)
    keys_seen, values_seen = reused.update(1, more, more)
    assert torch.equal(keys_seen[:, :, :32], written[:, :, :32]) and torch.equal(
        values_seen[:, :, :32], -written[:, :, :32]
    )
