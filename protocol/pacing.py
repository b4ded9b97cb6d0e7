"""Which sessions (or generations) are stepping now, and when the next step of each is due, so that
a batch can wait for the ones due soon.

A session's next step comes one round trip of its chain after its last one. The client's shared LM
head waits for rows due soon and so takes them in one product instead of two; the rows already
queued pay for the wait, so it lasts at most a share of their own round trip: generations out of
step fall into one product, while a fast one waits for a slow one only when the slow one is due soon.
A server's rounds use only the first half (which sessions are stepping): the same wait gained
nothing there in the runs measured.
"""

from __future__ import annotations

from typing import Hashable, Iterable

DUE_SLACK = 1.25  # a step is waited for until this many of its session's round trips after its last
PATIENCE_SHARE = 0.5  # a batch waits at most this share of its queued sessions' shortest round trip


class _Sender:
    __slots__ = ("batch", "asked", "round_trip")

    def __init__(self, batch: int, asked: float):
        self.batch, self.asked, self.round_trip = batch, asked, 0.0


class Arrivals:
    """The sessions stepping now (a step within the last `active_batches` batches) and when each one's
    next step is due. Not thread-safe: its owner holds its own lock or runs on one event loop."""

    def __init__(self, active_batches: int):
        self.active_batches = active_batches
        self.batches = 0  # batches run so far
        self._senders: dict[Hashable, _Sender] = {}

    def arrived(self, key: Hashable, now: float) -> None:
        """Session `key` sent a step at `now`."""
        sender = self._senders.get(key)
        if sender is None:
            self._senders[key] = _Sender(self.batches, now)
        else:
            sender.batch, sender.round_trip, sender.asked = self.batches, now - sender.asked, now

    def batch_ran(self) -> None:
        self.batches += 1

    def left(self, key: Hashable) -> None:
        """Session `key` is over: no batch waits for it."""
        self._senders.pop(key, None)

    def active(self) -> int:
        """Sessions stepping now (forgetting those that stopped)."""
        self._senders = {
            key: sender for key, sender in self._senders.items() if self.batches - sender.batch <= self.active_batches
        }
        return len(self._senders)

    def deadline(self, now: float, queued: Iterable[Hashable], unknown_wait: float, longest_wait: float) -> float:
        """Until when a batch whose steps of sessions `queued` wait now should wait for the others:
        `unknown_wait` from now (before round trips are known), or later for steps due within
        `PATIENCE_SHARE` of the queued sessions' shortest round trip and `longest_wait`."""
        queued = set(queued)
        trips = [self._senders[key].round_trip for key in queued if key in self._senders]
        shortest = min(trips) if trips else 0.0
        patience = min(longest_wait, PATIENCE_SHARE * shortest)
        deadline = now + unknown_wait
        for key, sender in self._senders.items():
            due = sender.asked + sender.round_trip
            if key not in queued and sender.round_trip and due <= now + patience:
                deadline = max(deadline, min(sender.asked + sender.round_trip * DUE_SLACK, now + patience))
        return deadline
