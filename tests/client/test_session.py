"""Who takes up a session that its server handed over or kept in its KV tier."""

from __future__ import annotations

from types import SimpleNamespace

from client.routing import RouteIndex, SpanPlan
from client.session import _takers
from tests.helpers.records import servers

TIER = "0123456789abcdef"  # a digest of the Redis both servers spill to


def span_on(blocks, peer: str) -> SimpleNamespace:
    info = next(block[peer] for block in blocks if peer in block)
    return SimpleNamespace(plan=SpanPlan(peer, 0, 8, info))


def test_a_server_that_kept_the_session_in_its_tier_is_asked_first_even_when_a_read_misses_it():
    tiered = {"first": {"kv_tier": TIER}, "second": {"kv_tier": TIER}}
    blocks = servers(("first", 0, 8), ("second", 0, 8), limits=tiered)
    old = span_on(blocks, "first")
    kept = SimpleNamespace(moved_to="first", tier=True)
    assert [info.peer_id for info in _takers(RouteIndex(blocks), old, kept, ())] == ["first", "second"]
    # A fresh read of the swarm that missed the first server's record (a DHT read under load).
    missed = servers(("second", 0, 8), limits=tiered)
    assert [info.peer_id for info in _takers(RouteIndex(missed), old, kept, ())] == ["first", "second"]
    # Banned, it is not asked; another server named in a notice must be in the read.
    assert [info.peer_id for info in _takers(RouteIndex(missed), old, kept, {"first"})] == ["second"]
    elsewhere = SimpleNamespace(moved_to="third", tier=False)
    assert _takers(RouteIndex(missed), old, elsewhere, ()) == []
