"""Load control an owner sets on a lent machine (seed 001): how much of it the swarm may take, and when.

Admission is decided before a session reserves any cache; a refusal is a "busy" reply, so clients
route elsewhere without banning this server.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from configs.schema import WorkingHours
from protocol.errors import ErrorKind, WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadPolicy:
    acceptance_rate: float = 1.0
    max_concurrent_sessions: Optional[int] = None
    max_sessions_per_hour: Optional[int] = None
    working_hours: Optional[WorkingHours] = None


class LoadControl:
    def __init__(
        self,
        policy: LoadPolicy,
        clock: Callable[[], float] = time.time,
        local_time: Callable[[], dt.time] = lambda: dt.datetime.now().time(),
        rng: Callable[[], float] = random.random,
    ):
        self.policy = policy
        self._clock = clock
        self._local_time = local_time
        self._rng = rng
        self._admitted: collections.deque[float] = collections.deque()

    def available(self) -> bool:
        """False outside the working hours: the server then announces itself unavailable."""
        hours = self.policy.working_hours
        return hours is None or hours.contains(self._local_time())

    def admit(self, open_sessions: int) -> None:
        """Admits one new session or raises a BUSY error saying why not."""
        policy = self.policy
        if not self.available():
            raise _busy(f"outside this server's working hours ({policy.working_hours})")
        if policy.max_concurrent_sessions is not None and open_sessions >= policy.max_concurrent_sessions:
            raise _busy(f"{open_sessions} sessions open, the owner allows {policy.max_concurrent_sessions}")
        now = self._clock()
        while self._admitted and self._admitted[0] <= now - 3600:
            self._admitted.popleft()
        if policy.max_sessions_per_hour is not None and len(self._admitted) >= policy.max_sessions_per_hour:
            raise _busy(f"the owner allows {policy.max_sessions_per_hour} new sessions per hour")
        if policy.acceptance_rate < 1.0 and self._rng() >= policy.acceptance_rate:
            raise _busy(f"declined: this server accepts {policy.acceptance_rate:.0%} of new sessions")
        self._admitted.append(now)


def _busy(message: str) -> WireError:
    return WireError(ErrorKind.BUSY, message)
