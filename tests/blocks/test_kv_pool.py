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
