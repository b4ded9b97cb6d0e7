"""Which blocks a server should host: pure functions of the swarm's records (no sockets, no torch).

Coverage of a block is the total inference throughput of the servers hosting it; a pipeline is only
as fast as its weakest block, so a new server takes the window of blocks whose weakest coverage is
lowest, and a running server moves only when that raises the swarm's weakest coverage by more than
a threshold (hysteresis, so servers do not flap).
"""

from __future__ import annotations

from typing import Optional

from dht.records import ServerInfo, ServerState

# A server that is still loading announces no throughput yet; it still counts as covering its blocks.
JOINING_WEIGHT = 1.0


def coverage(servers: list[dict[str, ServerInfo]], exclude_peer: Optional[str] = None) -> list[float]:
    """Per block: summed throughput of joining/online servers (draining and offline ones are leaving)."""
    totals = []
    for block in servers:
        total = 0.0
        for info in block.values():
            if info.peer_id == exclude_peer or info.record.state not in (ServerState.JOINING, ServerState.ONLINE):
                continue
            total += info.record.throughput.inference or JOINING_WEIGHT
        totals.append(total)
    return totals


def choose_start(cover: list[float], length: int) -> int:
    """Start of the `length`-block window to host: the one whose weakest blocks are weakest (leftmost on ties)."""
    if not 0 < length <= len(cover):
        raise ValueError(f"cannot host {length} blocks of a {len(cover)}-block model")
    return min(range(len(cover) - length + 1), key=lambda start: (sorted(cover[start : start + length]), start))


def with_server(cover: list[float], start: int, length: int, throughput: float) -> list[float]:
    return [value + (throughput if start <= i < start + length else 0.0) for i, value in enumerate(cover)]


def rebalance_target(
    cover_without_me: list[float], current_start: int, length: int, throughput: float, threshold: float
) -> Optional[int]:
    """A better start for this server, or None when moving would not raise the weakest block enough."""
    best = choose_start(cover_without_me, length)
    if best == current_start:
        return None
    now = min(with_server(cover_without_me, current_start, length, throughput))
    after = min(with_server(cover_without_me, best, length, throughput))
    if after > now * (1.0 + threshold) and after > now:
        return best
    return None
