"""Can other peers dial this server? Asked before the DHT node starts, since an unreachable server
must join the DHT as a client (peers would otherwise keep trying to dial it for DHT requests)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Optional, Sequence

from hivemind.p2p import P2P

from bridge.attached import ask_dial_back

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """A server listening on loopback serves only its own machine, where it is always reachable."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def check_reachability(initial_peers: Sequence[str], host: str, port: int) -> Optional[bool]:
    """Listens on host:port with a throwaway libp2p daemon and asks the initial peers to dial that
    port back at the address they see this machine at. None: nobody answered."""
    family = "ip6" if ":" in host else "ip4"
    p2p = await P2P.create(
        host_maddrs=[f"/{family}/{host}/tcp/{port}"],
        nat_port_map=False,
        auto_nat=False,
        use_relay=False,
        use_auto_relay=False,
        check_if_identity_free=False,
    )
    try:
        reply = await ask_dial_back(p2p, initial_peers, [port])
    finally:
        await p2p.shutdown()
    if reply is None:
        logger.warning("no initial peer could say whether this server is reachable; assuming it is")
        return None
    if reply.reachable:
        logger.info("reachable: %s dialed back %s:%d", "an initial peer", reply.observed_ip, port)
    else:
        logger.warning(
            "unreachable: peers see this machine as %s, and port %d there does not answer (NAT or "
            "firewall); serving through a bridge",
            reply.observed_ip,
            port,
        )
    return reply.reachable
