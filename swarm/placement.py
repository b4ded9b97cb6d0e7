"""Where this server sits in the model: the blocks given by --blocks, or the blocks the swarm lacks
most, chosen at start and moved later when another range would raise the swarm's weakest coverage by
more than --rebalance-threshold. The decisions are `swarm.selection`'s pure functions; this module
reads the swarm for them and keeps the answer."""

from __future__ import annotations

import logging
import random
from typing import Optional

import torch

from blocks.checkpoint import Checkpoint
from configs.schema import ServerOptions
from dht.swarm_dht import SwarmDHT
from swarm.hardware import free_memory
from swarm.selection import choose_start, coverage, rebalance_target

logger = logging.getLogger(__name__)


def blocks_that_fit(checkpoint: Checkpoint, dtype: torch.dtype, options: ServerOptions) -> int:
    """As many blocks as --max-memory-fraction of free memory holds, with their share of the KV cache."""
    per_block = checkpoint.block_bytes(0, dtype, options.quant) + options.cache_tokens * checkpoint.kv_bytes_per_token(
        dtype
    )
    fit = int(options.max_memory_fraction * free_memory(options.device) // per_block)
    if fit < 1:
        raise ValueError(
            f"not enough free memory on {options.device} for one block with --cache-tokens "
            f"{options.cache_tokens}: {per_block / 2**20:.0f} MiB needed"
        )
    return min(fit, checkpoint.num_blocks)


class Placement:
    """Blocks [start, end) of the model; with automatic blocks (`auto`), `length` of them anywhere."""

    def __init__(self, options: ServerOptions, checkpoint: Checkpoint, dtype: torch.dtype):
        self.options = options
        self.num_blocks = checkpoint.num_blocks
        self.auto = options.block_range is None
        if self.auto:
            self.length = options.num_blocks or blocks_that_fit(checkpoint, dtype, options)
            self.start, self.end = 0, self.length  # until the swarm has been looked at
        else:
            self.start, self.end = options.block_range
            self.length = self.end - self.start

    def move_to(self, start: int) -> None:
        self.start, self.end = start, start + self.length

    async def _coverage_without(self, dht: SwarmDHT, model: str) -> list[float]:
        return coverage(await dht.fetch_servers(model, self.num_blocks), exclude_peer=dht.peer_id)

    async def choose(self, dht: SwarmDHT, model: str) -> None:
        """Takes the blocks the swarm lacks most (the caller announces them at once, `joining`, so that
        servers starting right after this one choose other blocks)."""
        self.move_to(choose_start(await self._coverage_without(dht, model), self.length))
        logger.info("chose blocks %d:%d (the swarm's weakest)", self.start, self.end)

    def rebalance_delay(self) -> float:
        """Seconds to the next rebalancing check (jittered, so servers do not all move at once); inf if off."""
        if not self.auto or self.options.rebalance_period <= 0:
            return float("inf")
        return self.options.rebalance_period * random.uniform(0.5, 1.5)

    async def better_start(self, dht: SwarmDHT, model: str, throughput: float) -> Optional[int]:
        """Where the swarm needs this server more, or None to stay (raises if the swarm cannot be read)."""
        return rebalance_target(
            await self._coverage_without(dht, model),
            self.start,
            self.length,
            throughput,
            self.options.rebalance_threshold,
        )
