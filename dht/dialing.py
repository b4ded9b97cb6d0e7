"""Dialing a server at the addresses its record announces (the DHT alone may not have told the
libp2p daemon how to reach it yet)."""

from __future__ import annotations

import asyncio
from typing import Iterable

import base58
import varint
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.multiaddr.protocols import P_P2P


async def dial(p2p: P2P, peer_id: str, addrs: Iterable[str], timeout: float) -> PeerID:
    """Connects to `peer_id` (hivemind offers no public call for this, hence `_client`)."""
    peer = PeerID.from_base58(peer_id)
    # The daemon wants transport addresses: drop the trailing /p2p/<peer id>, only that one (a relayed
    # address is /…/p2p/<relay>/p2p-circuit/p2p/<peer id>, and its relay's id must stay).
    suffix = f"/p2p/{peer_id}"
    transport = [daemon_maddr(addr[: -len(suffix)] if addr.endswith(suffix) else addr) for addr in addrs]
    if transport:
        await asyncio.wait_for(p2p._client.connect(peer, transport), timeout)
    return peer


def daemon_maddr(addr: str) -> Multiaddr:
    """`addr` in the binary form the libp2p daemon parses. hivemind's multiaddr library writes a /p2p/
    component as a CID, which the daemon reads as a broken multihash ("length greater than remaining
    number of bytes"): a relayed address (/…/p2p/<relay>/p2p-circuit) would never dial. Here every
    /p2p/ component is the peer id's multihash, as go-multiaddr writes it."""
    parsed = Multiaddr(addr)
    if not any(protocol.code == P_P2P for protocol, _ in parsed.items()):
        return parsed
    raw = b""
    for protocol, value in parsed.items():
        if protocol.code == P_P2P:
            multihash = base58.b58decode(value)
            raw += varint.encode(P_P2P) + varint.encode(len(multihash)) + multihash
        else:
            raw += Multiaddr(f"/{protocol.name}" + (f"/{value}" if value is not None else "")).to_bytes()
    return Multiaddr(raw)
