"""The server's cache budget: refuses when full, releases once."""

from __future__ import annotations

import pytest
import torch

from blocks.kv_pool import KVPool
from protocol.errors import ErrorKind, WireError
from swarm.cache import CacheBudget


def test_cache_budget_refuses_when_full_and_releases_once():
    budget = CacheBudget(100)
    with pytest.raises(WireError) as info:
        budget.reserve(1, 10)  # no span served yet: no pool
    assert info.value.kind == ErrorKind.BUSY
    budget.bind(KVPool(1, 1, 2, 100, torch.float32, "cpu"))
    first = budget.reserve(2, 30)
    with pytest.raises(WireError) as info:
        budget.reserve(1, 50)
    assert info.value.kind == ErrorKind.BUSY
    with pytest.raises(WireError) as info:
        budget.reserve(1, 101)
    assert info.value.kind == ErrorKind.BAD_REQUEST
    first.release()
    first.release()
    assert budget.free == 100
