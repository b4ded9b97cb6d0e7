"""The KV pool: slices handed out, written in place, merged when given back."""

from __future__ import annotations

import pytest
import torch

from blocks.kv_pool import KVPool, PoolFull


def test_the_kv_pool_hands_out_slices_writes_in_place_and_merges_what_comes_back():
    pool = KVPool(num_layers=2, kv_heads=2, head_dim=4, tokens=100, dtype=torch.float32, device="cpu")
    a, b, c = pool.allocate(2, 20), pool.allocate(1, 30), pool.allocate(1, 30)
    with pytest.raises(PoolFull):
        pool.allocate(1, 11)
    keys, values = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    seen_keys, seen_values = a.update(1, keys, values)
    assert a.length(1) == 3 and a.length(0) == 0
    assert torch.equal(seen_keys, keys) and torch.equal(seen_values, values)
    assert seen_keys.untyped_storage().data_ptr() == pool.storage.untyped_storage().data_ptr()  # a view, not a copy
    more = torch.randn(2, 2, 1, 4)
    seen_keys, _ = a.update(1, more, more)
    assert torch.equal(seen_keys, torch.cat([keys, more], dim=2))
    b.update(0, torch.ones(1, 2, 30, 4), torch.ones(1, 2, 30, 4))
    assert torch.equal(a.update(0, keys, values)[0], keys)  # a neighbour's writes do not leak in
    with pytest.raises(ValueError, match="cache slots"):
        c.update(0, torch.zeros(1, 2, 31, 4), torch.zeros(1, 2, 31, 4))
    a.restore([0, 0])
    assert a.length(1) == 0
    b.release()
    with pytest.raises(PoolFull):
        pool.allocate(1, 40)  # only b's 30 are free
    a.release()
    assert pool.largest_free_run() == 70  # a's 40 and b's 30 merged
    c.release()
    c.release()
    assert pool.largest_free_run() == 100
    with pytest.raises(RuntimeError, match="given back"):
        c.update(0, keys, values)


def test_a_finished_session_keeps_its_first_tokens_and_a_new_one_is_filled_from_them():
    pool = KVPool(num_layers=1, kv_heads=1, head_dim=2, tokens=64, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="batch of one"):
        pool.allocate(2, 8).release(keep=4)
    first = pool.allocate(1, 32)
    written = torch.randn(1, 1, 20, 2)
    first.update(0, written, written)
    start = first.release(keep=16)
    assert pool.free == 64 - 16 - 16  # the batch of two above was not given back
    second = pool.allocate(1, 24)
    second.fill(torch.arange(start, start + 16))
    assert second.lengths() == [16]
    keys, _ = second.update(0, written[:, :, 16:], written[:, :, 16:])
    assert torch.equal(keys, written)


def test_a_session_s_cache_exported_from_one_pool_is_the_same_in_another():
    """What a server hands over (`export`) and another takes (`write_layers`), a sub-range of layers included."""
    torch.manual_seed(0)
    source, target = (KVPool(3, 2, 4, 64, torch.float32, "cpu") for _ in range(2))
    cache = source.allocate(2, 16)
    for layer in range(3):
        cache.update(layer, torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4))
    chunks = cache.export(10, 4, first=1, count=2)
    assert [chunk.shape[4] for chunk in chunks] == [4, 4, 2] and chunks[0].shape[:4] == (2, 2, 2, 2)
    other = target.allocate(2, 16)
    at = 0
    for chunk in chunks:
        other.write_layers(chunk, at, first=0)
        at += chunk.shape[4]
    assert other.lengths()[:2] == [10, 10] and other.lengths()[2] == 0
    for layer in (0, 1):
        keys, values = other.update(layer, torch.zeros(2, 2, 0, 4), torch.zeros(2, 2, 0, 4))
        mine, theirs = cache.update(layer + 1, torch.zeros(2, 2, 0, 4), torch.zeros(2, 2, 0, 4))
        assert torch.equal(keys, mine) and torch.equal(values, theirs)
    with pytest.raises(ValueError, match="does not hold 11 positions"):
        cache.export(11, 4, first=0, count=3)
    with pytest.raises(ValueError, match="cannot write"):
        other.write_layers(chunks[0], 3, first=0)  # not where the layers end
