"""The client's view of one model in the swarm, put together: a client-mode DHT node and its reads
(`SwarmView`), routing (`Router`), what failures cost (`FailurePolicy`), verification (`ClientAudit`),
and the event loop all of it runs on. Sessions and `generate()` use it; it calls none of them."""

from __future__ import annotations

import asyncio
import atexit
import logging
import weakref
from typing import Awaitable, Callable, Collection, Mapping, Optional, Sequence

import torch
from hivemind.p2p import P2P

from blocks.adapters import LoraAdapter
from blocks.checkpoint import Checkpoint
from client.adapters import LocalAdapters, SessionAdapter
from client.audit import ClientAudit
from client.bans import BanList
from client.failures import FailurePolicy, step_deadline
from client.forward import forward_chain
from client.pings import PingCache
from client.prefix_memory import DEFAULT_PREFIX_MEMORY_MBYTES, PrefixMemory
from client.router import Router
from client.routing import SpanPlan
from client.runtime import LoopThread
from client.span import SpanSession, forward_span
from client.swarm_view import SwarmView
from configs.schema import DEFAULT_VERIFY_RATE
from dht.swarm_dht import SwarmDHT, start_dht
from protocol.tensors import MAX_MESSAGE_BYTES, cap_incoming_messages, moved
from telemetry import tracing

logger = logging.getLogger(__name__)


class RemoteModel:
    """Connects to the swarm (a client-mode DHT node) and finds servers for `model`'s blocks."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        initial_peers: Sequence[str],
        model_name: Optional[str] = None,
        *,
        request_timeout: float = 30.0,
        max_chunk_tokens: int = 1024,
        max_retries: int = 5,
        step_timeout: Optional[float] = 300.0,
        nat_port_map: bool = False,
        reliability: Optional[Callable[[], Awaitable[Mapping[str, float]]]] = None,
        min_reliability: float = 0.0,
        ban_seconds: float = 5.0,
        push: bool = True,
        verify: float = DEFAULT_VERIFY_RATE,
        region: str = "",
        prefix_cache_mbytes: float = DEFAULT_PREFIX_MEMORY_MBYTES,
        otlp_endpoint: Optional[str] = None,
        quant: Optional[frozenset[str]] = None,
    ):
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddr of at least one swarm peer")
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"step_timeout must be a positive number of seconds or None, got {step_timeout}")
        self.checkpoint = checkpoint
        self.model_name = model_name or checkpoint.default_model_name
        self.num_blocks = checkpoint.num_blocks
        self.request_timeout = request_timeout
        self.max_chunk_tokens = max_chunk_tokens
        self.max_retries = max_retries
        self.push = push  # servers hand each step's output to the next server of the chain
        if prefix_cache_mbytes < 0:
            raise ValueError(f"prefix_cache_mbytes must be 0 or more, got {prefix_cache_mbytes}")
        # finished prompts, to reuse servers' prefix caches (None: this client never does)
        self.prefix_memory = PrefixMemory(int(prefix_cache_mbytes * 2**20)) if prefix_cache_mbytes > 0 else None
        self.step_timeout = step_timeout
        self.local_adapters = LocalAdapters(checkpoint)  # the client's own LoRA adapters (`load_adapter`)
        dht, validator = start_dht(initial_peers, client_mode=True, nat_port_map=nat_port_map)
        if otlp_endpoint:  # after the DHT's process is forked: it needs no exporter thread of its own
            tracing.enable(otlp_endpoint, "swarm-client")
        self.dht = SwarmDHT(dht, validator)
        self.runtime = LoopThread()
        cap_incoming_messages()  # a server's reply cannot make this process buffer more than the cap either
        self.p2p: P2P = self.runtime.run(dht.replicate_p2p(), timeout=request_timeout)
        self.bans = BanList(base=ban_seconds)
        self.view = SwarmView(self.dht, checkpoint, self.model_name)
        self.pings = PingCache(self.p2p, self.bans.ban, timeout=min(request_timeout, 5.0))
        self.router = Router(self.view, self.bans, self.pings, reliability, min_reliability, region, quant)
        self.failures = FailurePolicy(self.bans, self.pings, self.view.latest_record)
        self.audit = ClientAudit(
            verify,
            checkpoint,
            self.router,
            self.failures,
            self.bans,
            self.pings,
            self.forward_span,
            self.open_span,
            self.chunk_tokens,
            reliability,
            self.local_adapters,
        )
        self.closed = False
        # A script that never calls shutdown() still exits at once and quietly (no pending-task warnings).
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    async def make_chain(
        self,
        start: int = 0,
        end: Optional[int] = None,
        exclude: Collection[str] = (),
        avoid_owner: str = "",
        max_age: float = 0.0,
    ) -> list[SpanPlan]:
        """The fastest chain for blocks [start, end) now (see `Router.chain`)."""
        return await self.router.chain(start, end, exclude, avoid_owner, max_age)

    async def served_adapters(self) -> list[str]:
        servers = await self.view.servers()
        return sorted({name for block in servers for info in block.values() for name in info.record.adapters})

    def chunk_tokens(self, batch_size: int) -> int:
        """Tokens per message within the client's limit and the message size limit (each span further
        splits by its own server's announced limit)."""
        bytes_per_token = batch_size * self.checkpoint.hidden_size * 4
        return max(1, min(self.max_chunk_tokens, MAX_MESSAGE_BYTES // 2 // bytes_per_token))

    async def forward_span(
        self, plan: SpanPlan, hidden: torch.Tensor, mask: Optional[torch.Tensor], adapter: str = ""
    ) -> torch.Tensor:
        """A stateless forward through one server's span of the chain (with `adapter`, one it serves)."""
        chunk = self.chunk_tokens(hidden.shape[0])
        return await forward_span(self.p2p, self.model_name, plan, hidden, mask, chunk, self.request_timeout, adapter)

    async def open_span(
        self, plan: SpanPlan, batch_size: int, max_length: int, adapter: Optional[SessionAdapter] = None
    ) -> SpanSession:
        """An inference session on one server's span (what a spot check keeps its KV in)."""
        span = SpanSession(plan, self.request_timeout)
        name, own = await self.span_adapter(adapter, plan)
        await span.open(
            self.p2p, self.model_name, batch_size, max_length, self.failures.bridges_to_avoid(), adapter=name, own=own
        )
        return span

    async def span_adapter(
        self, adapter: Optional[SessionAdapter], plan: SpanPlan
    ) -> tuple[str, Optional[LoraAdapter]]:
        """What a span of a session with `adapter` opens with: the adapter's name, and for the client's
        own its tensors for the span's blocks (read off the event loop); ("", None) where the
        client's own adapter has no weights for those blocks, or without an adapter."""
        if adapter is None:
            return "", None
        if not adapter.own:
            return adapter.name, None
        own = await asyncio.to_thread(self.local_adapters.for_span, adapter.name, plan.start, plan.end)
        return (adapter.name, own) if own is not None and own.layers else ("", None)

    async def aforward(
        self, hidden: torch.Tensor, mask: Optional[torch.Tensor] = None, adapter: Optional[SessionAdapter] = None
    ) -> torch.Tensor:
        """Hidden states of all positions after every block, without keeping any cache (on the input's
        device; what travels is copied to host off the event loop). With `adapter`, one the servers
        serve: a stateless forward carries no adapter of the client's own (ValueError)."""
        if adapter is not None and adapter.own:
            raise ValueError(
                f"a stateless forward cannot send the client's own adapter {adapter.name!r}: "
                "use generate() or an inference session"
            )
        name = adapter.name if adapter is not None else ""
        device = hidden.device
        hidden, mask = await moved(hidden, "cpu"), await moved(mask, "cpu")

        async def forward(plan: SpanPlan, part: torch.Tensor, part_mask: Optional[torch.Tensor]) -> torch.Tensor:
            return await self.forward_span(plan, part, part_mask, name)

        async with step_deadline(self.step_timeout, "forward pass"):
            output = await forward_chain(self.router, self.failures, forward, hidden, mask, self.max_retries, adapter)
        return await moved(output, device)

    def shutdown(self) -> None:
        """Leaves the swarm: the P2P daemon, the loop thread and the DHT node stop (once; at exit too)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.runtime.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.runtime.stop()
        self.dht.shutdown()
        self.audit.shutdown()
        tracing.flush()  # this client's last spans leave now, not at the exporter's next batch


def _shutdown_at_exit(remote: "weakref.ref[RemoteModel]") -> None:
    model = remote()
    if model is not None:
        model.shutdown()
