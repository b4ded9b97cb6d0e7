"""Crawls the DHT for every model and its servers, and pings the online ones."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from hivemind.p2p import P2P

from client import PingCache
from dht.records import ServerState
from dht.swarm_dht import SwarmDHT, agreed_meta
from relay.health.state import SwarmState, model_health
from relay.timestamps import iso

logger = logging.getLogger(__name__)


class Crawler:
    def __init__(self, dht: SwarmDHT, p2p: P2P, period: float):
        self.dht = dht
        self.period = period
        self.pings = PingCache(p2p, max_age=period / 2, timeout=min(period, 5.0))
        self.state: Optional[SwarmState] = None

    async def crawl(self) -> SwarmState:
        models = []
        for name in await self.dht.fetch_models():
            metas = await self.dht.fetch_meta(name)
            # Records are validated (at most MAX_BLOCKS blocks), so the widest claim bounds this read.
            servers = await self.dht.fetch_servers(name, max((m.num_blocks for m in metas.values()), default=0))
            meta = agreed_meta(metas, servers)
            servers = servers[: meta.num_blocks] if meta is not None else []
            online = {
                info.peer_id: info
                for block in servers
                for info in block.values()
                if info.record.state == ServerState.ONLINE
            }
            await self.pings.refresh(online.values())
            rtts = {peer: rtt for peer, rtt in self.pings.rtts().items() if peer in online}
            models.append(model_health(name, meta, servers, rtts))
        self.state = SwarmState(updated_at=iso(time.time()), models=models)
        return self.state

    async def run(self) -> None:
        """Crawls every `period` seconds until cancelled; a failed crawl keeps the last state."""
        while True:
            try:
                await self.crawl()
            except Exception:
                logger.warning("crawl failed; keeping the previous state", exc_info=True)
            await asyncio.sleep(self.period)
