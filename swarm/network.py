"""A server's network bandwidth estimate: timed round trips of a 1 MiB payload to other servers."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable, Optional

import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from dht.dialing import dial
from dht.records import ServerInfo
from protocol.messages import RPC_ECHO, pack
from protocol.tensors import read_tensors

logger = logging.getLogger(__name__)

PAYLOAD_BYTES = 1024 * 1024
ROUNDS = 3  # round trips per peer; the best counts


async def measure_bandwidth(
    p2p: P2P, peers: Iterable[ServerInfo], timeout: float = 5.0, rounds: int = ROUNDS
) -> Optional[float]:
    """Megabits per second of the best round trip to up to 3 peers (payload both ways), or None if
    none answered (e.g. the first server of a swarm). Each peer gets `rounds` round trips: the first
    one over a fresh connection is slow (its stream windows are still small), so one alone would
    make a fast link look several times slower than it is."""
    payload = torch.zeros(PAYLOAD_BYTES // 4, dtype=torch.float32)
    request = pack(None, [payload], request=True)
    best: Optional[float] = None
    for info in list(peers)[:3]:
        try:
            peer = await dial(p2p, info.peer_id, info.record.addrs, timeout)
            for _ in range(rounds):
                started = time.perf_counter()
                reply = await asyncio.wait_for(
                    p2p.call_protobuf_handler(peer, RPC_ECHO, request, runtime_pb2.ExpertResponse), timeout
                )
                elapsed = time.perf_counter() - started
                (echoed,) = read_tensors(reply, max_count=1)
                if echoed.numel() * 4 == PAYLOAD_BYTES:
                    mbps = 2 * PAYLOAD_BYTES * 8 / elapsed / 1e6
                    best = mbps if best is None else max(best, mbps)
        except Exception as e:
            logger.debug("bandwidth probe to %s failed: %s", info.peer_id, e)
            continue
    return best
