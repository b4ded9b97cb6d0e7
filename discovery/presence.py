"""A node's presence on its LAN with `--mdns` (servers and bootstrap nodes): it looks for the swarm's
peers there before its DHT starts, announces itself once it is up, and joins any peer found later (so
two servers started at the same moment, each alone at first, end up in one swarm)."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

from dht.swarm_dht import SwarmDHT
from discovery.mdns import LanDiscovery, lan_addrs

logger = logging.getLogger(__name__)

BROWSE_SECONDS = 3.0  # how long a node without --initial-peers looks for peers before it starts alone


class LanPresence:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.discovery: Optional[LanDiscovery] = None
        self.found_at_start = False
        self._task: Optional[asyncio.Task] = None

    async def initial_peers(self, given: Sequence[str]) -> list[str]:
        """`given`, or with --mdns and none given, the multiaddrs of the peers found on the LAN
        (raises discovery.MdnsUnavailable when mDNS cannot run here)."""
        if not self.enabled:
            return list(given)
        self.discovery = await asyncio.to_thread(LanDiscovery)
        if given:
            return list(given)
        found = await asyncio.to_thread(self.discovery.wait_for_peers, BROWSE_SECONDS)
        self.found_at_start = bool(found)
        if found:
            logger.info("mDNS: joining the swarm of %d peer(s) found on the LAN", len(self.discovery.snapshot()))
        return found

    def announce(self, dht: SwarmDHT, reachable: bool) -> None:
        """Announces this node on the LAN (`reachable`: others can dial it) and, from now on, joins
        every peer found there."""
        if self.discovery is None:
            return
        self.discovery.exclude.add(dht.peer_id)
        addrs = lan_addrs(dht.visible_maddrs()) if reachable else []
        if addrs:
            self.discovery.advertise(addrs)
        else:
            logger.warning(
                "--mdns: this node listens on no address another machine can dial (%s), so it is not "
                "announced on the LAN; pass --host with its LAN address, or 0.0.0.0",
                ", ".join(dht.visible_maddrs()) or "none",
            )
        self._task = asyncio.create_task(self._meet_new_peers(dht))

    async def _meet_new_peers(self, dht: SwarmDHT) -> None:
        met: dict[str, list[str]] = {}
        while True:
            for peer_id, addrs in self.discovery.snapshot().items():
                if met.get(peer_id) == addrs:
                    continue
                met[peer_id] = addrs
                try:
                    joined = await dht.meet(addrs)
                except Exception as e:  # a stalled DHT: the next find tries again
                    logger.info("mDNS: could not meet %s: %s", peer_id, e)
                    met.pop(peer_id)
                    continue
                logger.info("mDNS: %s peer %s found on the LAN", "met" if joined else "could not reach", peer_id)
            await asyncio.to_thread(self.discovery.wait_for_change, 5.0)

    async def close(self) -> None:
        """Withdraws the announcement (a goodbye on the LAN) and stops looking."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.discovery is not None:
            await asyncio.to_thread(self.discovery.close)
