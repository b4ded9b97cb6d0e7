"""The relay's request authentication: hashed tokens, signatures, replay guards, lockouts and throttling."""

from __future__ import annotations

import pytest

from protocol.worker_auth import ACCESS_TOKEN_TTL, needs_refresh, sign, signing_payload
from relay.auth import (
    AuthError,
    Lockout,
    ReplayGuard,
    ReplayWindowFull,
    SignedBeforeStart,
    WindowLimit,
    hash_secret,
    new_secret,
    secret_matches,
    verify_signature,
)


def test_tokens_are_stored_hashed_and_compared_safely():
    token = new_secret()
    stored = hash_secret(token)
    assert token not in stored and len(stored) == 64
    assert secret_matches(token, stored) and not secret_matches(token + "x", stored)
    assert not needs_refresh(1000 + ACCESS_TOKEN_TTL, 1000)
    assert needs_refresh(1000 + ACCESS_TOKEN_TTL, 1000 + 20 * 3600)


def test_signatures_cover_method_path_body_and_time():
    secret, body, ts = "s3cret", b'{"status": "ok"}', "1700000000"
    assert signing_payload("post", "/api/v1/workers/7/heartbeat", body, ts).startswith(
        b"POST:/api/v1/workers/7/heartbeat:"
    )
    signature = sign(secret, "POST", "/p", body, ts)
    verify_signature(secret, "POST", "/p", body, ts, signature, now=1700000010, replays=ReplayGuard())
    for tampered in [("GET", "/p", body, ts), ("POST", "/q", body, ts), ("POST", "/p", body + b" ", ts)]:
        with pytest.raises(AuthError, match="bad X-Signature"):
            verify_signature(secret, *tampered, signature, now=1700000010, replays=ReplayGuard())
    with pytest.raises(AuthError, match="away from the server's clock"):
        verify_signature(secret, "POST", "/p", body, ts, signature, now=1700000000 + 301, replays=ReplayGuard())
    for bad_time in ("yesterday", "nan", "NaN", "inf", "-inf"):
        with pytest.raises(AuthError, match="unix seconds"):
            verify_signature(
                secret,
                "POST",
                "/p",
                body,
                bad_time,
                sign(secret, "POST", "/p", body, bad_time),
                now=1700000000,
                replays=ReplayGuard(),
            )
    guard = ReplayGuard()
    verify_signature(secret, "POST", "/p", body, ts, signature, now=1700000000, replays=guard)
    with pytest.raises(AuthError, match="replayed"):
        verify_signature(secret, "POST", "/p", body, ts, signature, now=1700000001, replays=guard)


def test_a_full_replay_guard_refuses_instead_of_forgetting_fresh_signatures():
    guard = ReplayGuard(window=600, capacity=2)
    guard.check_and_remember("a", now=1000)
    guard.check_and_remember("b", now=1001)
    with pytest.raises(ReplayWindowFull, match="too many signed requests"):  # nobody's fault: no lockout
        guard.check_and_remember("c", now=1002)
    with pytest.raises(AuthError, match="replayed"):  # "a" is still remembered: it cannot be resent
        guard.check_and_remember("a", now=1003)
    guard.check_and_remember("c", now=1000 + 601)  # once "a" has aged out, there is room again


def test_a_restarted_guard_refuses_what_was_signed_before_it_started():
    """A new process remembers nothing: whatever was signed earlier may have been seen by the last one."""
    guard = ReplayGuard(not_before=1000)
    with pytest.raises(SignedBeforeStart, match="signed before the relay started"):
        guard.check_and_remember("old", now=1001, signed_at=999.5)
    guard.check_and_remember("new", now=1001, signed_at=1000.5)
    secret, body = "s3cret", b"{}"
    stale = sign(secret, "POST", "/p", body, "999.0")
    with pytest.raises(SignedBeforeStart):
        verify_signature(secret, "POST", "/p", body, "999.0", stale, now=1001, replays=guard)


def test_five_failures_lock_an_account_for_fifteen_minutes():
    lockout = Lockout()
    for _ in range(4):
        lockout.failed("w1", now=0)
        lockout.check("w1", now=0)
    lockout.failed("w1", now=0)
    with pytest.raises(AuthError, match="locked after 5 failed"):
        lockout.check("w1", now=899)
    lockout.check("w1", now=901)
    lockout.check("w2", now=0)  # other accounts are unaffected
    lockout.failed("w3", now=0)
    lockout.succeeded("w3")
    for _ in range(4):
        lockout.failed("w3", now=0)
    lockout.check("w3", now=0)  # a success reset the count


def test_failures_without_a_valid_credential_are_throttled_per_source_over_a_sliding_window():
    throttle = WindowLimit(limit=3, window=60)
    assert [throttle.hit("10.0.0.1", now=t) for t in (0, 1, 2)] == [None, None, None]
    assert throttle.hit("10.0.0.1", now=3) == 57  # the oldest failure leaves the window at t=60
    assert throttle.hit("10.0.0.2", now=3) is None  # other sources are unaffected
    assert throttle.hit("10.0.0.1", now=70) is None  # old failures age out
    small = WindowLimit(limit=1, window=60, max_keys=2)
    for source in ("a", "b", "c"):
        small.hit(source, now=0)
    assert small.hit("a", now=1) is None  # the least recently failing source was forgotten first
