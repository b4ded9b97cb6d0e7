"""This server's side of NAT: whether peers can dial it at all, and then either a bridge for servers
that nobody can dial, or attached to bridges itself (see the `bridge` package)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from hivemind.p2p import P2P

from bridge.attached import BridgeAttachment
from bridge.node import BridgeLimits, BridgeNode, swarm_membership
from configs.schema import ServerOptions
from dht.ports import free_port
from dht.records import ServerInfo, ServerState
from dht.swarm_dht import SwarmDHT, public_announce
from protocol.messages import SWARM_RPCS
from swarm.reachability import check_reachability, is_loopback

logger = logging.getLogger(__name__)

FIRST_ATTACH_TIMEOUT = 60.0  # seconds an unreachable server waits for a bridge before going online anyway


class Bridging:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.reachable = True
        self.initial_peers: list[str] = list(options.initial_peers)
        self.attachment: Optional[BridgeAttachment] = None  # when unreachable: the bridges it is attached to

    @property
    def bridge_addrs(self) -> tuple[str, ...]:
        return self.attachment.bridges if self.attachment is not None else ()

    @property
    def is_bridge(self) -> bool:
        return self.reachable and not self.options.no_bridge

    async def listen_address(self, initial_peers: list[str]) -> tuple[int, list[str]]:
        """The port to listen on and the addresses to announce; sets `reachable`. An operator's
        --public-ip or --announce-maddrs is trusted; a loopback server is reachable by all its peers;
        otherwise the initial peers (given, or found on the LAN) are asked to dial this machine back."""
        opts = self.options
        self.initial_peers = list(initial_peers)
        port, announce = public_announce(opts.public_ip, opts.host, opts.port, opts.announce_maddrs)
        if announce or is_loopback(opts.host) or not initial_peers:
            return port, announce
        port = port or free_port(opts.host)
        self.reachable = await check_reachability(initial_peers, opts.host, port) is not False
        return port, announce

    async def start(
        self,
        p2p: P2P,
        dht: SwarmDHT,
        servers: Callable[[], Awaitable[list[dict[str, ServerInfo]]]],
        changed: Callable[[], Awaitable[None]],
        claim: Callable[[], tuple[str, int]],
    ) -> Optional[asyncio.Task]:
        """A reachable server is a bridge for unreachable ones (unless --no-bridge); an unreachable one
        attaches to bridges found among the initial peers and `servers()` (calling `changed()` whenever
        the set changes) and waits, bounded, for the first attachment, so that it goes online usable."""
        opts = self.options
        if self.reachable:
            prove = swarm_membership(dht, dht.peer_id)
            await BridgeNode(p2p, SWARM_RPCS, prove, BridgeLimits.of(opts), carry=not opts.no_bridge).start()
            return None
        if opts.no_bridge:
            logger.warning("this server is unreachable and --no-bridge is set: no peer can use it")
            return None
        attached = asyncio.Event()

        async def on_change(bridges: tuple[str, ...]) -> None:
            if bridges:
                attached.set()
            await changed()

        async def candidates() -> list[str]:
            try:
                found = await servers()
            except Exception as e:
                logger.info("could not read the swarm for bridges: %s", e)
                found = []
            return bridge_candidates(self.initial_peers, found, dht.peer_id)

        self.attachment = BridgeAttachment(p2p, candidates, on_change, claim)
        task = asyncio.create_task(self.attachment.run(), name="bridge attachment")
        try:
            await asyncio.wait_for(attached.wait(), FIRST_ATTACH_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning(
                "no bridge accepted this server within %.0f s; it stays unusable until one does", FIRST_ATTACH_TIMEOUT
            )
        return task


def bridge_candidates(initial_peers: list[str], servers: list[dict[str, ServerInfo]], own_peer_id: str) -> list[str]:
    """Bridges to attach to: the initial peers (bootstrap nodes are bridges by default), then reachable
    online servers that announce they are bridges."""
    candidates = list(initial_peers)
    for block in servers:
        for info in block.values():
            record = info.record
            if (
                info.peer_id != own_peer_id
                and record.bridge_node
                and record.reachable
                and record.state == ServerState.ONLINE
            ):
                for addr in record.addrs:
                    addr = addr if addr.endswith(f"/p2p/{info.peer_id}") else f"{addr}/p2p/{info.peer_id}"
                    if addr not in candidates:
                        candidates.append(addr)
    return candidates
