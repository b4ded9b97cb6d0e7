"""Dialing a server at the addresses its record announces (the DHT alone may not have told the
libp2p daemon how to reach it yet)."""

from __future__ import annotations

import asyncio
from typing import Iterable

from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr


async def dial(p2p: P2P, peer_id: str, addrs: Iterable[str], timeout: float) -> PeerID:
    """Connects to `peer_id` (hivemind offers no public call for this, hence `_client`)."""
    peer = PeerID.from_base58(peer_id)
    # The daemon wants transport addresses: drop the trailing /p2p/<peer id>.
    transport = [Multiaddr(addr.split("/p2p/")[0]) for addr in addrs]
    if transport:
        await asyncio.wait_for(p2p._client.connect(peer, transport), timeout)
    return peer
