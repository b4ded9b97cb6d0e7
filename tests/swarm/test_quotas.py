"""Per-peer limits: one peer's streams, sessions, cache tokens and waiting bytes are capped, the others'
are not touched, and everything goes back when a session ends."""

from __future__ import annotations

import pytest

from protocol.errors import ErrorKind, WireError
from swarm.quotas import PeerLimits, PeerQuotas


def busy(call, *args):
    with pytest.raises(WireError) as error:
        with call(*args):
            pass
    assert error.value.kind == ErrorKind.BUSY and "per-peer limit" in error.value.message
    return error.value.message


def test_sessions_and_cache_tokens_are_capped_per_peer_and_given_back():
    quotas = PeerQuotas(PeerLimits(max_sessions=2, max_cache_share=0.5), cache_total=1000, max_length=100)
    with quotas.session("greedy", 300, True), quotas.session("greedy", 200, True):
        assert "500 cache tokens" in busy(quotas.session, "greedy", 1, False)  # the share: 500 of 1000
        with quotas.session("honest", 500, True):
            pass
    with quotas.session("greedy", 100, True), quotas.session("greedy", 100, True):
        assert "2 sessions" in busy(quotas.session, "greedy", 100, True)
        with quotas.session("greedy", 100, False):  # a stateless forward is not a session
            pass
    assert not quotas.sessions and not quotas.tokens
    # One session of the longest length a client may open always fits, whatever the share.
    small_share = PeerQuotas(PeerLimits(max_cache_share=0.01), cache_total=1000, max_length=100)
    with small_share.session("p", 100, True):
        busy(small_share.session, "p", 1, True)


def test_streams_and_waiting_bytes_are_capped_per_peer():
    quotas = PeerQuotas(PeerLimits(max_streams=2, max_buffered_bytes=1000), cache_total=1000, max_length=100)
    with quotas.stream("p"), quotas.stream("p"):
        busy(quotas.stream, "p")
        with quotas.stream("q"):
            pass
    assert not quotas.streams
    quotas.hold("p", 600)
    with pytest.raises(WireError, match="per-peer limit"):
        quotas.hold("p", 600)
    quotas.hold("q", 600)
    quotas.drop("p", 600)
    quotas.hold("p", 1000)
    quotas.drop("p", 1000)
    quotas.drop("q", 600)
    assert not quotas.buffered
