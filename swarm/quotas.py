"""What one peer may hold on this server at once: open streams, sessions, reserved cache tokens and
bytes of messages waiting to be computed. Without these, one peer could reserve every cache token,
hold the sessions idle until they time out and fill memory with messages read ahead, and take the
server from everyone else. A peer over a limit is answered BUSY (its client routes elsewhere); the
others are not affected.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from protocol.errors import ErrorKind, WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerLimits:
    max_streams: int = 64  # inference sessions and stateless forwards open at once
    max_sessions: int = 32  # inference sessions open at once
    max_cache_share: float = 0.5  # share of the cache budget one peer's sessions may reserve (one full session always)
    max_buffered_bytes: int = 256 << 20  # message bytes read ahead or pushed and not computed yet


class PeerQuotas:
    """Counts per peer id what it holds now; `max_length` is the longest session a client may open
    (one session of it at batch 1 always fits a peer's cache share)."""

    def __init__(self, limits: PeerLimits, cache_total: int, max_length: int):
        self.limits = limits
        self.max_tokens = max(int(limits.max_cache_share * cache_total), max_length)
        self.streams: Counter[str] = Counter()
        self.sessions: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.buffered: Counter[str] = Counter()

    @contextlib.contextmanager
    def stream(self, peer: str) -> Iterator[None]:
        """One open stream of `peer`'s for the body's duration (BUSY over the limit)."""
        if self.streams[peer] >= self.limits.max_streams:
            raise _busy(f"{self.streams[peer]} streams of yours are open here, at most {self.limits.max_streams}")
        self.streams[peer] += 1
        try:
            yield
        finally:
            _decrement(self.streams, peer, 1)

    @contextlib.contextmanager
    def session(self, peer: str, tokens: int, persistent: bool) -> Iterator[None]:
        """A session of `peer`'s reserving `tokens` cache tokens for the body's duration; a stateless
        forward (not `persistent`) counts its tokens but not as a session."""
        if persistent and self.sessions[peer] >= self.limits.max_sessions:
            raise _busy(f"{self.sessions[peer]} sessions of yours are open here, at most {self.limits.max_sessions}")
        if self.tokens[peer] + tokens > self.max_tokens:
            raise _busy(
                f"your sessions here hold {self.tokens[peer]} cache tokens; {tokens} more would pass your "
                f"share of {self.max_tokens}"
            )
        self.sessions[peer] += persistent
        self.tokens[peer] += tokens
        try:
            yield
        finally:
            _decrement(self.sessions, peer, int(persistent))
            _decrement(self.tokens, peer, tokens)

    def hold(self, peer: str, nbytes: int) -> None:
        """`nbytes` of `peer`'s messages wait here from now on (BUSY over the limit); `drop` them once done."""
        if self.buffered[peer] + nbytes > self.limits.max_buffered_bytes:
            raise _busy(
                f"{self.buffered[peer] + nbytes} bytes of your messages would wait here, at most "
                f"{self.limits.max_buffered_bytes}"
            )
        self.buffered[peer] += nbytes

    def drop(self, peer: str, nbytes: int) -> None:
        _decrement(self.buffered, peer, nbytes)


def _decrement(counter: Counter[str], peer: str, amount: int) -> None:
    counter[peer] -= amount
    if counter[peer] <= 0:
        del counter[peer]


def _busy(message: str) -> WireError:
    return WireError(ErrorKind.BUSY, f"per-peer limit: {message}")
