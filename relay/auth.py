"""Worker authentication (spec R5, seed 001), the relay's side: tokens stored hashed, request
signatures (`protocol.worker_auth`) checked, stale-timestamp and replay refusal, account lockout.

Pure except for the clock, which callers pass in; every comparison of secrets is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Optional

from protocol.worker_auth import sign

MAX_CLOCK_SKEW = 300.0
MAX_FAILURES = 5
LOCKOUT_SECONDS = 15 * 60.0
SOURCE_FAILURES_PER_MINUTE = 30


class AuthError(Exception):
    """Authentication failed; the message is safe to return to the caller (no secret in it)."""


class RetryableAuthError(AuthError):
    """A refusal that is nobody's fault: it never counts toward a lockout; signing again helps."""


class ReplayWindowFull(RetryableAuthError):
    """The replay guard holds as many fresh signatures as it may: retry shortly."""


class SignedBeforeStart(RetryableAuthError):
    """Signed before this relay process started: its replay guard cannot know whether it was seen."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What is stored instead of a token: tokens are 256-bit random, so one SHA-256 suffices."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


class ReplayGuard:
    """Remembers signatures seen within the allowed clock skew, so a captured request cannot be resent."""

    def __init__(self, window: float = 2 * MAX_CLOCK_SKEW, capacity: int = 100_000, not_before: float = -math.inf):
        """`not_before`: when this guard started remembering (the process's start). What was signed
        earlier may have been seen by a previous process, so it is refused: a restart opens no replay window."""
        self.window = window
        self.capacity = capacity
        self.not_before = not_before
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check_and_remember(self, signature: str, now: float, signed_at: Optional[float] = None) -> None:
        """Forgets only signatures older than the window: evicting a fresher one would let it be replayed,
        so when the guard is full of fresh signatures new requests are refused until some age out."""
        if signed_at is not None and signed_at < self.not_before:
            raise SignedBeforeStart("signed before the relay started; sign it again with the current time")
        while self._seen and next(iter(self._seen.values())) < now - self.window:
            self._seen.popitem(last=False)
        if signature in self._seen:
            raise AuthError("replayed request")
        if len(self._seen) >= self.capacity:
            raise ReplayWindowFull("too many signed requests in the replay window; retry shortly")
        self._seen[signature] = now


def verify_signature(
    signing_secret: str,
    method: str,
    path: str,
    body: bytes,
    timestamp: str,
    signature: str,
    now: float,
    replays: ReplayGuard,
) -> None:
    """Raises AuthError unless the signature is right, fresh and not seen before."""
    try:
        sent_at = float(timestamp)
    except (TypeError, ValueError):
        raise AuthError("X-Timestamp must be unix seconds") from None
    if not math.isfinite(sent_at):  # nan compares false with everything: it would pass the skew check
        raise AuthError("X-Timestamp must be unix seconds")
    if abs(now - sent_at) > MAX_CLOCK_SKEW:
        raise AuthError(f"X-Timestamp is more than {MAX_CLOCK_SKEW:.0f} s away from the server's clock")
    expected = sign(signing_secret, method, path, body, timestamp)
    if not hmac.compare_digest(expected, signature or ""):
        raise AuthError("bad X-Signature")
    replays.check_and_remember(signature, now, signed_at=sent_at)


@dataclass
class _Account:
    failures: int = 0
    locked_until: float = 0.0


class Lockout:
    """5 failed authentications lock an account for 15 minutes; a success resets the count."""

    def __init__(self, max_failures: int = MAX_FAILURES, seconds: float = LOCKOUT_SECONDS):
        self.max_failures = max_failures
        self.seconds = seconds
        self._accounts: dict[str, _Account] = {}

    def check(self, account: str, now: float) -> None:
        entry = self._accounts.get(account)
        if entry is not None and entry.locked_until > now:
            raise AuthError(
                f"account locked after {self.max_failures} failed authentications; "
                f"retry in {entry.locked_until - now:.0f} s"
            )

    def failed(self, account: str, now: float) -> None:
        entry = self._accounts.setdefault(account, _Account())
        entry.failures += 1
        if entry.failures >= self.max_failures:
            entry.locked_until = now + self.seconds
            entry.failures = 0

    def succeeded(self, account: str) -> None:
        self._accounts.pop(account, None)


class WindowLimit:
    """Events per key over a sliding window (failed authentications per source address, reports per
    API key and worker); past `limit` events in the window, the caller refuses with 429."""

    def __init__(self, limit: int = SOURCE_FAILURES_PER_MINUTE, window: float = 60.0, max_keys: int = 10_000):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: OrderedDict[object, deque[float]] = OrderedDict()

    def hit(self, key: object, now: float) -> Optional[float]:
        """Counts one event; returns the seconds to wait if `key` is now over the limit, else None."""
        times = self._events.pop(key, None) or deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        times.append(now)
        self._events[key] = times  # most recently active last
        while len(self._events) > self.max_keys:
            self._events.popitem(last=False)
        if len(times) > self.limit:
            return max(1.0, times[0] + self.window - now)
        return None
