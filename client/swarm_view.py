"""The client's reads of the swarm's DHT for one model: records validated on read, the model's
identity checked once against the local checkpoint, and the latest read kept for routing."""

from __future__ import annotations

import time
from typing import Awaitable, Optional

from blocks.checkpoint import Checkpoint
from client.errors import MissingBlocksError, ModelMismatchError, SwarmError
from client.routing import RouteIndex
from dht.records import ServerInfo
from dht.swarm_dht import DHTUnavailableError, SwarmDHT, agreed_meta


class SwarmView:
    def __init__(self, dht: SwarmDHT, checkpoint: Checkpoint, model_name: str):
        self.dht = dht
        self.checkpoint = checkpoint
        self.model_name = model_name
        self.num_blocks = checkpoint.num_blocks
        self._meta_checked = False
        self._last_read: Optional[tuple[float, RouteIndex]] = None  # (when, what) of the latest read

    async def servers(self) -> list[dict[str, ServerInfo]]:
        """A fresh read: for each block, the valid records of the servers announcing it."""
        return await _read(self.dht.fetch_servers(self.model_name, self.num_blocks))

    async def index(self, max_age: float = 0.0) -> RouteIndex:
        """The servers arranged for routing; a read at most `max_age` seconds old is used again."""
        now = time.monotonic()
        if self._last_read is not None and now - self._last_read[0] <= max_age:
            return self._last_read[1]
        servers = await self.servers()
        await self._check_model(servers)
        index = RouteIndex(servers)
        self._last_read = (now, index)
        return index

    def latest_record(self, peer_id: str) -> Optional[ServerInfo]:
        """`peer_id`'s record in the latest read, if any."""
        return self._last_read[1].record_of(peer_id) if self._last_read is not None else None

    async def _check_model(self, servers: list[dict[str, ServerInfo]]) -> None:
        """Fails clearly if the swarm's servers (`servers`, as just read) announce another model under this name.

        The model record that most serving servers sign wins: one stranger's record cannot make
        every client fail."""
        if self._meta_checked:
            return
        agreed = agreed_meta(await _read(self.dht.fetch_meta(self.model_name)), servers)
        if agreed is None:
            raise MissingBlocksError(self.model_name, list(range(self.num_blocks)))
        ours = self.checkpoint
        if agreed.config_digest != ours.config_digest or agreed.num_blocks != self.num_blocks:
            raise ModelMismatchError(
                f"servers announce a different model as {self.model_name!r} ({agreed.family}, {agreed.num_blocks} "
                f"blocks, config {agreed.config_digest[:12]}) than the local checkpoint "
                f"({ours.family.model_type}, {self.num_blocks} blocks, config {ours.config_digest[:12]})"
            )
        self._meta_checked = True


async def _read(read: Awaitable):
    try:
        return await read
    except DHTUnavailableError as e:
        raise SwarmError(f"cannot read the swarm's DHT: {e}") from e
