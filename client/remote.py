"""The client's view of one model in the swarm: DHT lookups, model check, chains, stateless forward."""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

import torch
from hivemind.p2p import P2P

from blocks.checkpoint import Checkpoint
from blocks.wire import MAX_MESSAGE_BYTES
from client.errors import MissingBlocksError, ModelMismatchError
from client.routing import SpanPlan, make_chain
from client.runtime import LoopThread
from client.span import forward_span
from dht.swarm_dht import SwarmDHT, start_dht

logger = logging.getLogger(__name__)


class RemoteModel:
    """Connects to the swarm (a client-mode DHT node) and finds servers for `model`'s blocks."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        initial_peers: Sequence[str],
        model_name: Optional[str] = None,
        *,
        request_timeout: float = 60.0,
        max_chunk_tokens: int = 1024,
        nat_port_map: bool = False,
    ):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of at least one swarm peer")
        self.checkpoint = checkpoint
        self.model_name = model_name or checkpoint.default_model_name
        self.num_blocks = checkpoint.num_blocks
        self.request_timeout = request_timeout
        self.max_chunk_tokens = max_chunk_tokens
        dht, validator = start_dht(initial_peers, client_mode=True, nat_port_map=nat_port_map)
        self.dht = SwarmDHT(dht, validator)
        self.runtime = LoopThread()
        self.p2p: P2P = self.runtime.run(dht.replicate_p2p(), timeout=request_timeout)
        self._meta_checked = False

    async def check_model(self) -> None:
        """Fails clearly if the swarm's servers announce another model under this name."""
        if self._meta_checked:
            return
        records = await self.dht.fetch_meta(self.model_name)
        if not records:
            raise MissingBlocksError(self.model_name, list(range(self.num_blocks)))
        for record in records:
            if record.config_digest != self.checkpoint.config_digest or record.num_blocks != self.num_blocks:
                raise ModelMismatchError(
                    f"servers announce a different model as {self.model_name!r} ({record.family}, {record.num_blocks} "
                    f"blocks, config {record.config_digest[:12]}) than the local checkpoint "
                    f"({self.checkpoint.family.model_type}, {self.num_blocks} blocks, config {self.checkpoint.config_digest[:12]})"
                )
        self._meta_checked = True

    async def make_chain(self, start: int = 0, end: Optional[int] = None, exclude: Sequence[str] = ()) -> list[SpanPlan]:
        await self.check_model()
        servers = await self.dht.fetch_servers(self.model_name, self.num_blocks)
        return make_chain(self.model_name, servers, start, self.num_blocks if end is None else end, exclude)

    def chunk_tokens(self, batch_size: int, chain: list[SpanPlan]) -> int:
        """Tokens per message: within every server's limit and the message size limit."""
        bytes_per_token = batch_size * self.checkpoint.hidden_size * 4
        by_size = MAX_MESSAGE_BYTES // 2 // bytes_per_token
        by_servers = min(plan.info.record.max_chunk_tokens for plan in chain)
        return max(1, min(self.max_chunk_tokens, by_size, by_servers))

    async def aforward(self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states of all positions after every block, without keeping any cache."""
        chain = await self.make_chain()
        chunk = self.chunk_tokens(hidden.shape[0], chain)
        dtype = hidden.dtype
        for plan in chain:
            hidden = await forward_span(self.p2p, self.model_name, plan, hidden, mask, chunk, self.request_timeout)
        return hidden.to(dtype)

    def shutdown(self) -> None:
        try:
            self.runtime.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.runtime.stop()
        self.dht.shutdown()
