"""A block server's lifecycle: join the DHT → load blocks → measure → announce → serve → leave."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from tqdm import tqdm

from blocks.adapters import AdapterError, check_adapter, load_adapter
from blocks.checkpoint import Checkpoint, dtype_name, parse_dtype, validate_model_name
from blocks.loading import load_span
from blocks.openmp import serial_torch
from blocks.quantization import resident_bytes
from blocks.span import BlockSpan
from configs.paths import cache_dir
from configs.schema import ServerOptions, WorkingHours, adapter_name
from dht.identity import receipt_signer
from dht.records import ModelRecord, ServerRecord, ServerState, Throughput
from dht.swarm_dht import DHTUnavailableError, SwarmDHT, start_dht
from discovery.mdns import MdnsUnavailable
from discovery.presence import BROWSE_SECONDS, LanPresence
from protocol.errors import ErrorKind, WireError, bad_request
from protocol.messages import (
    RPC_BUNDLE,
    RPC_ECHO,
    RPC_FORWARD,
    RPC_IMPORT,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    RPC_PUSH_STREAM,
    Hop,
    Moved,
    error_response,
    pack,
)
from protocol.receipts import TIER_TARGET, public_key_hex
from protocol.tensors import cap_incoming_messages
from swarm import __version__
from swarm.batching import StepScheduler
from swarm.bridging import Bridging
from swarm.cache import CacheBudget
from swarm.compute import ComputeThread
from swarm.coordinator import Coordinator
from swarm.handler import BlockHandler, Limits
from swarm.handover import EXPORT_TIMEOUT, Exporter, can_take, handover_target
from swarm.hardware import describe_device, release_memory
from swarm.kv_tier import HostTier, RedisTier
from swarm.load_control import LoadControl, LoadPolicy
from swarm.metrics import ServerMetrics
from swarm.network import measure_bandwidth
from swarm.placement import Placement
from swarm.preflight import check_model_and_blocks
from swarm.push import LocalPush, PushStream
from swarm.quotas import PeerLimits
from swarm.sessions import ServerSession
from swarm.status import Cache, Load, Reachability, RecentProblems, RelayState, ServerStatus, Sessions, StatusFile
from swarm.throughput import cached_throughput
from telemetry import tracing

logger = logging.getLogger(__name__)

HANDOVER_RETRY_S = 5.0  # a drain tries again to hand over the sessions it could not: 5 s in, then 10 and 20 s later,
HANDOVER_RETRY_MAX_S = 30.0  # then every 30 s
NETWORK_MEASURE_SECONDS = 15.0  # the longest a bandwidth measurement may hold up the announcements


class Server:
    """One server's life, from loading its blocks to announcing `offline`. Its collaborators decide
    the rest: `Placement` which blocks (and when to move), `Bridging` how peers reach it behind NAT,
    `Coordinator` what it tells an optional relay, `BlockHandler` what its RPCs answer."""

    def __init__(self, options: ServerOptions):
        self.options = options
        self.state = ServerState.JOINING
        check_model_and_blocks(options)
        self.checkpoint = Checkpoint(options.model)
        self.model_name = validate_model_name(options.model_name or self.checkpoint.default_model_name)
        self.dtype = parse_dtype(options.dtype)
        self.placement = Placement(options, self.checkpoint, self.dtype)
        self.bridging = Bridging(options)
        self.lan = LanPresence(options.mdns)
        # LoRA adapters served, by name: NAME=PATH, or the folder named after the adapter
        self.adapter_paths = {adapter_name(entry): entry.split("=", 1)[-1] for entry in options.adapters}
        prefix_tokens = (options.prefix_cache_tokens or options.cache_tokens) if options.prefix_cache else 0
        self.budget = CacheBudget(options.cache_tokens, min(prefix_tokens, options.cache_tokens))
        self.load = LoadControl(
            LoadPolicy(
                acceptance_rate=options.acceptance_rate,
                max_concurrent_sessions=options.max_concurrent_sessions,
                max_sessions_per_hour=options.max_sessions_per_hour,
                working_hours=WorkingHours.parse(options.working_hours) if options.working_hours else None,
            )
        )
        self.limits = Limits(
            max_length=options.max_length or min(self.checkpoint.config.max_position_embeddings, options.cache_tokens),
            max_batch_size=options.max_batch_size,
            max_chunk_tokens=options.max_chunk_tokens,
            session_timeout=options.session_timeout,
            max_client_adapter_bytes=int(options.max_client_adapter_mbytes * 2**20),
        )
        self.compute = ComputeThread()
        self.metrics = ServerMetrics(
            self.model_name,
            on_gpu=options.device.startswith("cuda"),
            open_sessions=lambda: self.handler.open_sessions if self.handler else 0,
            waiting=lambda: self.scheduler.waiting,
            cache_usage=lambda: 1.0 - self.budget.free / self.budget.total,
        )
        self.scheduler = StepScheduler(self.compute, options.max_batch_tokens, on_round=self.metrics.batch_round)
        self.metrics_port: Optional[int] = None
        self.coordinator: Optional[Coordinator] = None
        self.throughput: Optional[Throughput] = None
        self.network_mbps: Optional[float] = None
        self.span: Optional[BlockSpan] = None
        self.dht: Optional[SwarmDHT] = None
        self.handler: Optional[BlockHandler] = None
        self.exporter: Optional[Exporter] = None
        self.tier: Optional[RedisTier] = None  # the prefix cache's Redis tier (--kv-redis)
        self.host_tier: Optional[HostTier] = None  # ... and its host-memory tier before it (--kv-host-mbytes)
        self.tier_id = ""  # which Redis that is, as servers sharing it announce
        self.p2p: Optional[P2P] = None
        self._stop = asyncio.Event()
        self._force_stop = asyncio.Event()
        self.exit_code = 0  # what `python -m swarm.serve` exits with once `run()` returns
        self.started = time.time()
        self.problems = RecentProblems()
        logging.getLogger().addHandler(self.problems)

    def stop(self) -> None:
        """First call: drain, then leave. A second call (another Ctrl-C) skips the drain."""
        if self._stop.is_set():
            self._force_stop.set()
        self._stop.set()

    async def run(self) -> None:
        opts = self.options
        # Only the compute thread runs OpenMP teams (`swarm.compute`): the event loop and its workers
        # allocate, copy and check tensors on their own.
        serial_torch()
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="swarm-io", initializer=serial_torch)
        )
        try:
            await self.compute.run(self._check_adapters)
        except AdapterError as e:
            print(f"swarm.serve: error: {e}", file=sys.stderr, flush=True)
            self.exit_code = 2
            return
        try:
            initial_peers = await self.lan.initial_peers(opts.initial_peers)
        except MdnsUnavailable as e:
            print(f"swarm.serve: error: {e}", file=sys.stderr, flush=True)
            self.exit_code = 2
            return
        port, announce = await self.bridging.listen_address(initial_peers)
        # The DHT forks a child process: start it before torch spins up its thread pools, and before
        # installing signal handlers that the child must not inherit.
        dht, validator = start_dht(
            initial_peers,
            require_peers=not self.lan.found_at_start,  # a stranger on the LAN may announce what never answers
            host=opts.host,
            port=port,
            identity_path=opts.identity,
            nat_port_map=opts.nat_port_map,
            announce_maddrs=announce,
            client_mode=not self.bridging.reachable,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop)
        self.dht = SwarmDHT(dht, validator)
        if opts.otlp_endpoint:  # after the DHT's process is forked: it needs no exporter thread of its own
            tracing.enable(opts.otlp_endpoint, "swarm-server", {"service.instance.id": self.dht.peer_id})
        if opts.mdns and not initial_peers:
            logger.warning(
                "mDNS: no swarm peer found on this LAN in %g s: this server starts a swarm of its own, and "
                "joins the peers it finds later",
                BROWSE_SECONDS,
            )
        elif not initial_peers:
            logger.warning(
                "no --initial-peers: this server starts a swarm of its own; others join it with --initial-peers %s",
                next(iter(self.dht.visible_maddrs()), "(this server's address)"),
            )
        self.lan.announce(self.dht, self.bridging.reachable)
        self.receipt_signer = receipt_signer(validator)
        p2p = None
        metrics_runner = None
        coordinator_task = None
        attachment_task = None
        try:
            if self.placement.auto:
                await self.placement.choose(self.dht, self.model_name)
                await self._announce()
            self.span = await self.compute.run(self._load)
            if self._stop.is_set():
                return
            self.throughput = await self._throughput()
            p2p = await self._open_handlers(dht)
            attachment_task = await self.bridging.start(
                p2p, self.dht, self._read_swarm, self._bridges_changed, lambda: (self.model_name, self.placement.start)
            )
            metrics_runner, self.metrics_port = await self.metrics.serve(opts.host, opts.metrics_port, self.status)
            if opts.status_file:
                StatusFile.write(Path(opts.status_file), f"http://{local_host(opts.host)}:{self.metrics_port}/status")
            await self._announce()
            self.state = ServerState.ONLINE
            await self._announce()
            print(
                f"swarm.serve online: model {self.model_name}, blocks {self.placement.start}:{self.placement.end}, "
                f"peer {self.dht.peer_id}, {self.throughput.inference:.1f} tokens/s, "
                f"metrics http://{opts.host}:{self.metrics_port}/metrics",
                flush=True,
            )
            if opts.relay:
                self.coordinator = self._coordinator()
                coordinator_task = asyncio.create_task(self.coordinator.link.run(self._stop, lambda: self.state.value))
            await self._measure_network()
            await self._serve_until_stopped()
            await self._drain()
        finally:
            if attachment_task is not None:
                attachment_task.cancel()
                await asyncio.gather(attachment_task, return_exceptions=True)
            if coordinator_task is not None:
                coordinator_task.cancel()
                await asyncio.gather(coordinator_task, return_exceptions=True)
                await self.coordinator.link.goodbye()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            if opts.status_file:
                StatusFile.remove(Path(opts.status_file))
            await self.lan.close()
            await self._leave(p2p)

    def status(self) -> str:
        """This server's state for its operator (`GET /status`, read by `swarm.worker status`), as JSON."""
        opts = self.options
        link = self.coordinator.link if self.coordinator is not None else None
        relay = None
        if opts.relay:
            relay = RelayState(
                url=opts.relay,
                worker_id=link.credentials.worker_id if link is not None and link.credentials else None,
                last_heartbeat_seconds_ago=time.time() - link.last_beat if link and link.last_beat else None,
                last_error=link.last_error if link is not None else None,
            )
        prefixes = self.budget.prefixes
        return ServerStatus(
            state=self.state.value,
            version=__version__,
            model=self.model_name,
            start_block=self.placement.start,
            end_block=self.placement.end,
            peer_id=self.dht.peer_id if self.dht is not None else "",
            addresses=self.dht.visible_maddrs() if self.dht is not None else [],
            region=opts.region,
            uptime_seconds=time.time() - self.started,
            sessions=Sessions(
                open=self.handler.open_sessions if self.handler else 0,
                max_concurrent=self.load.policy.max_concurrent_sessions,
                max_length=self.limits.max_length,
            ),
            cache=Cache(
                tokens_total=self.budget.total,
                tokens_free=self.budget.free,
                prefix_tokens=prefixes.tokens if prefixes is not None else 0,
            ),
            load=Load(
                throughput_tokens_per_s=self.throughput.inference if self.throughput else None,
                acceptance_rate=self.load.policy.acceptance_rate,
                requests_waiting=self.scheduler.waiting,
                median_step_ms=self.metrics.median_step_ms(),
                prompt_tokens=self.metrics.totals["prompt_tokens"],
                generation_tokens=self.metrics.totals["generation_tokens"],
            ),
            relay=relay,
            reachability=Reachability(
                reachable=self.bridging.reachable,
                bridge=self.bridging.is_bridge,
                attached_bridges=list(self.bridging.bridge_addrs),
            ),
            recent_problems=self.problems.problems(),
        ).model_dump_json()

    def _coordinator(self) -> Coordinator:
        return Coordinator(
            self.options,
            self.dht,
            self.model_name,
            self.load,
            load=lambda: {
                "open_sessions": self.handler.open_sessions if self.handler else 0,
                "cache_tokens_free": self.budget.free,
                "cache_tokens_total": self.budget.total,
                "start_block": self.placement.start,
                "end_block": self.placement.end,
            },
            latency_ms=self.metrics.median_step_ms,
            metrics_port=lambda: self.metrics_port,
            announce=self._announce,
        )

    async def _read_swarm(self) -> list:
        return await self.dht.fetch_servers(self.model_name, self.checkpoint.num_blocks)

    async def _bridges_changed(self) -> None:
        if self.throughput is not None:  # announced already: say where it is reachable now
            await self._announce()

    async def _throughput(self) -> Throughput:
        if self.options.throughput:
            return Throughput(inference=self.options.throughput, forward=self.options.throughput)
        return await self.compute.run(
            cached_throughput,
            self.span,
            self.model_name,
            describe_device(self.options.device).device_name,
            __version__,
            cache_dir(),
            self.options.quant,
        )

    async def _open_handlers(self, dht) -> P2P:
        """Registers the RPC handlers on the DHT's libp2p daemon; returns the P2P handle to close later."""
        cap_incoming_messages()
        self._kv_tiers()
        self.handler = BlockHandler(
            model=self.model_name,
            span=self.span,
            budget=self.budget,
            scheduler=self.scheduler,
            limits=self.limits,
            version=__version__,
            state=lambda: self.state.value,
            accepting=lambda: self.state == ServerState.ONLINE,
            admit=self.load.admit,
            metrics=self.metrics,
            push=self._push,
            signer=self.receipt_signer,
            peer_limits=PeerLimits(
                max_streams=self.options.max_streams_per_peer,
                max_sessions=self.options.max_sessions_per_peer,
                max_cache_share=self.options.max_cache_share_per_peer,
                max_buffered_bytes=int(self.options.max_buffered_mbytes_per_peer * (1 << 20)),
            ),
            peer_id=self.dht.peer_id,
            receipt_key_of=self._receipt_key_of,
            move_session=self._move_on_request,
            kv_tier=self.tier,
            spill_session=self._spill_session if self.tier or self.host_tier else None,
            host_tier=self.host_tier,
        )
        if self.tier is not None:
            self.tier_id = await self.tier.identity()
        p2p = self.p2p = await dht.replicate_p2p()
        self.exporter = Exporter(
            p2p,
            self.model_name,
            self.dht.peer_id,
            self.receipt_signer,
            self.handler.precision_of,
            lambda: self.span.kv_bytes_per_token(),
            lambda: self.span.start,
            lambda: len(self.span),
        )
        for name, method, stream in (
            (RPC_INFERENCE, self.handler.rpc_inference, True),
            (RPC_BUNDLE, self.handler.rpc_bundle, True),
            (RPC_FORWARD, self.handler.rpc_forward, True),
            (RPC_INFO, self.handler.rpc_info, False),
            (RPC_ECHO, self.handler.rpc_echo, False),
            (RPC_PUSH, self.handler.rpc_push, False),
        ):
            await p2p.add_protobuf_handler(
                name, method, runtime_pb2.ExpertRequest, stream_input=stream, stream_output=stream
            )
        await p2p.add_protobuf_handler(
            RPC_PUSH_STREAM,
            self.handler.rpc_push_stream,
            runtime_pb2.ExpertRequest,
            stream_input=True,
            stream_output=False,
        )
        await p2p.add_protobuf_handler(
            RPC_IMPORT, self.handler.rpc_import, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
        )
        return p2p

    def _kv_tiers(self) -> None:
        """The KV cache's tiers beyond the pool: host memory (`self.host_tier`), then Redis (`self.tier`)."""
        if self.options.kv_redis:
            self.tier = RedisTier(self.options.kv_redis, self.receipt_signer, self.options.kv_redis_ttl)
        if self.options.kv_host_mbytes > 0:
            self.host_tier = HostTier(int(self.options.kv_host_mbytes * 2**20), self.tier)
        if (self.tier or self.host_tier) and not self.options.prefix_cache:
            logger.warning("with --no-prefix-cache the KV tiers keep idle sessions only (no prefix pages)")

    async def _spill_session(self, session: ServerSession) -> Optional[runtime_pb2.ExpertResponse]:
        """A session idle past --session-timeout goes to the KV tier instead of being dropped: its
        client's notice (`Moved`, tier) or None where it cannot (then it is closed as before)."""
        movable = session in self.handler.movable_sessions()
        if (self.tier is None and self.host_tier is None) or self.exporter is None or not movable:
            return None
        try:
            header, tensors = await self.exporter.package(session, *session.blocks, TIER_TARGET)
        except Exception as e:
            logger.info("session %s: could not keep it in the KV tier: %s: %s", session.key, type(e).__name__, e)
            return None
        if self.host_tier is not None:
            self.host_tier.put_session(session.key, header.model_dump(mode="json"), tensors)
        elif not await self.tier.put_session(session.key, header.model_dump(mode="json"), tensors):
            return None
        logger.info("session %s idle: kept in the KV tier at position %d", session.key, header.position)
        notice = Moved(
            moved_to=self.dht.peer_id,
            addrs=tuple(self.dht.visible_maddrs()[:16]),
            position=header.position,
            digest=header.digest,
            signature=header.signature,
            tier=True,
        )
        return pack(notice, request=False)

    async def _spill_prefixes(self) -> None:
        """Copies every prefix page to the tiers (before the pool goes: a move, or exit), and what host
        memory holds on to Redis."""
        prefixes = self.budget.prefixes
        if self.tier is None or prefixes is None:
            return
        spilled = prefixes.spill_all()
        await asyncio.sleep(0)  # the copies are handed over on this loop
        if self.host_tier is not None:
            self.host_tier.spill_all()
        await self.tier.flush()
        logger.info("kv tier: %d prefix page(s) kept in Redis", spilled)

    async def _receipt_key_of(self, peer_id: str, block: int) -> str:
        """The receipt key `peer_id` announces in its record of `block` ("" if it announces none)."""
        try:
            servers = await self.dht.fetch_block(self.model_name, block)
        except DHTUnavailableError:
            return ""
        info = servers.get(peer_id)
        return info.record.receipt_key if info is not None else ""

    async def _move_on_request(self, session: ServerSession, peer_id: str) -> tuple[runtime_pb2.ExpertResponse, bool]:
        """A client asks to move its session to `peer_id` (from a prefill server to a decode one):
        (the signed `Moved` notice, True), or (an error reply saying why not, False): it stays here."""
        start, end = session.blocks
        try:
            servers = await self.dht.fetch_block(self.model_name, start)
        except DHTUnavailableError as e:
            return error_response(WireError(ErrorKind.BUSY, f"cannot read the swarm now: {e}")), False
        info = servers.get(peer_id)
        computes_in = (self.options.dtype, self.options.quant)
        room = {peer_id: info.record.cache_tokens_free} if info is not None else {}
        if info is None or not can_take(info, session, self.dht.peer_id, computes_in, room):
            why = f"server {peer_id} cannot take this session (blocks, precision, adapter, length or room)"
            return error_response(bad_request(why)), False
        try:
            reply = await asyncio.wait_for(self.exporter.export(session, start, end, info), EXPORT_TIMEOUT)
        except Exception as e:
            logger.info("session %s: could not move to %s: %s: %s", session.key, peer_id, type(e).__name__, e)
            return error_response(WireError(ErrorKind.BUSY, f"could not move the session to {peer_id}: {e}")), False
        return reply, True

    async def _hand_over(self) -> None:
        """On drain: every open session that another server of its blocks can take (the same dtype,
        quantization and adapter, room in its cache) goes there with its KV cache, and its client
        goes on without replaying anything; the others finish here as before."""
        sessions = self.handler.movable_sessions() if self.handler is not None else []
        if not sessions or self.exporter is None:
            return
        try:
            servers = await self.dht.fetch_servers(self.model_name, self.checkpoint.num_blocks)
        except DHTUnavailableError as e:
            logger.warning("draining: cannot read the swarm to hand sessions over (%s)", e)
            return
        room = {info.peer_id: info.record.cache_tokens_free for block in servers for info in block.values()}
        moves = []
        for session in sessions:
            target = handover_target(servers, session, self.dht.peer_id, (self.options.dtype, self.options.quant), room)
            if target is not None:
                room[target.peer_id] -= session.batch * session.max_length
                moves.append(self.exporter.move(session, *session.blocks, target))
        moved = sum(await asyncio.gather(*moves)) if moves else 0
        logger.info(
            "draining: handed %d of %d open session(s) to other servers with their caches", moved, len(sessions)
        )

    def _push(self, hop: Hop, failed: Callable[[str], None]) -> PushStream | LocalPush:
        """A stream to the next server of a client's chain (server-to-server push); `failed(reason)`
        hears if it breaks."""
        if hop.peer_id == self.dht.peer_id:
            return LocalPush(hop, lambda message: self.handler.accept_push(message, self.dht.peer_id), failed)
        return PushStream(self.p2p, hop, failed)

    async def _measure_network(self) -> None:
        """Bandwidth to a few other servers of the swarm, announced once known. While none answers
        (the first server of a swarm), it is measured again at each announce period."""
        try:
            measured = await asyncio.wait_for(self._measured_network(), NETWORK_MEASURE_SECONDS)
        except asyncio.TimeoutError:
            measured = False
        if measured:
            await self._announce()

    async def _measured_network(self) -> bool:
        try:
            servers = await self.dht.fetch_servers(self.model_name, self.checkpoint.num_blocks)
        except Exception:
            logger.warning("could not read the swarm to measure bandwidth", exc_info=True)
            return False
        others = {
            info.peer_id: info
            for block in servers
            for info in block.values()
            if info.peer_id != self.dht.peer_id and info.record.state == ServerState.ONLINE and info.record.reachable
        }
        self.network_mbps = await measure_bandwidth(self.p2p, others.values())
        if self.network_mbps is None:
            return False
        logger.info("network: %.0f Mbit/s to other servers", self.network_mbps)
        return True

    async def _serve_until_stopped(self) -> None:
        """Refreshes the records every announce period and, with automatic blocks, checks for a better range."""
        loop = asyncio.get_running_loop()
        next_rebalance = loop.time() + self.placement.rebalance_delay()
        while not self._stop.is_set():
            timeout = max(0.0, min(self.options.announce_period, next_rebalance - loop.time()))
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=timeout)
            except asyncio.TimeoutError:
                if loop.time() >= next_rebalance:
                    moved = await self._maybe_move()
                    # After a move that could not load its blocks, wait longer before trying again.
                    next_rebalance = loop.time() + self.placement.rebalance_delay() * (1 if moved is not False else 10)
                await self._announce()
                if self.network_mbps is None:  # announced with the record: clients weigh moving KV by it
                    await self._measure_network()

    async def _maybe_move(self) -> Optional[bool]:
        """Moves to the blocks the swarm needs more, if any: True when it moved, False when loading the
        new blocks failed (it serves its old ones again), None when it stayed."""
        try:
            target = await self.placement.better_start(self.dht, self.model_name, self.throughput.inference)
        except Exception:
            logger.warning("could not read the swarm to rebalance; will retry", exc_info=True)
            return None
        if target is None:
            return None
        old = (self.placement.start, self.placement.end)
        logger.info(
            "moving from blocks %d:%d to %d:%d: the swarm needs them more", *old, target, target + self.placement.length
        )
        self.state = ServerState.DRAINING
        await self._announce()
        await self._hand_over()
        await self._wait_for_sessions()
        self.state = ServerState.OFFLINE
        await self._announce()
        # Free the old blocks before loading the new ones: holding both could exhaust the memory that
        # automatic sizing counted for one span. Sessions left after the drain end with a clear error.
        await self._spill_prefixes()
        closed = self.handler.retire_span(
            f"server moved from blocks {old[0]}:{old[1]} to other blocks; open the session again elsewhere"
        )
        if closed:
            logger.warning("closed %d session(s) still open after the drain", closed)
        self.span = None
        await self.compute.run(release_memory, self.options.device)
        self.placement.move_to(target)
        self.state = ServerState.JOINING
        await self._announce()
        try:
            self.span = await self.compute.run(self._load)
        except Exception as e:
            logger.error(
                "could not load blocks %d:%d (%s: %s); loading blocks %d:%d again",
                self.placement.start,
                self.placement.end,
                type(e).__name__,
                e,
                *old,
            )
            self.placement.move_to(old[0])
            await self.compute.run(release_memory, self.options.device)
            try:
                self.span = await self.compute.run(self._load)
            except Exception:
                logger.exception("could not load blocks %d:%d again either; leaving the swarm", *old)
                self.exit_code = 1
                self._stop.set()
                self._force_stop.set()
                return False
        self.handler.serve_span(self.span)
        self.state = ServerState.ONLINE
        await self._announce()
        if (self.placement.start, self.placement.end) == old:
            return False
        print(
            f"swarm.serve moved: model {self.model_name}, blocks {self.placement.start}:{self.placement.end}, "
            f"peer {self.dht.peer_id}",
            flush=True,
        )
        return True

    def _check_adapters(self) -> None:
        """Every --adapters entry is a LoRA adapter of this model (read whole once, before joining)."""
        for name, path in self.adapter_paths.items():
            try:
                check_adapter(path, self.checkpoint.config, name)
            except AdapterError as e:
                raise AdapterError(f"adapter {name} ({path}): {e}") from None
            logger.info("serving LoRA adapter %s from %s", name, path)

    def _load(self) -> BlockSpan:
        with tqdm(
            total=self.placement.end - self.placement.start,
            desc=f"loading blocks {self.placement.start}:{self.placement.end}",
            unit="block",
            file=sys.stderr,
            disable=None,
        ) as bar:
            span = load_span(
                self.checkpoint,
                self.placement.start,
                self.placement.end,
                self.dtype,
                self.options.device,
                progress=lambda _: bar.update(1),
                quant=self.options.quant,
            )
        span.adapters = {
            name: load_adapter(
                path, self.checkpoint.config, span.start, span.end, self.dtype, self.options.device, name
            )
            for name, path in self.adapter_paths.items()
        }
        logger.info(
            "blocks %d:%d hold %.1f MiB of weights (%s%s)",
            span.start,
            span.end,
            resident_bytes(span.layers) / 2**20,
            dtype_name(self.dtype),
            "" if self.options.quant == "none" else f", {self.options.quant}",
        )
        return span

    def record(self) -> ServerRecord:
        return ServerRecord(
            state=self.state,
            start_block=self.placement.start,
            end_block=self.placement.end,
            throughput=self.throughput or Throughput(inference=0, forward=0),
            cache_tokens_free=self.budget.free,
            cache_tokens_total=self.budget.total,
            max_length=self.limits.max_length,
            max_chunk_tokens=self.limits.max_chunk_tokens,
            dtype=dtype_name(self.dtype),
            quant=self.options.quant,
            adapters=tuple(self.adapter_paths),
            role=self.options.role,
            kv_tier=self.tier_id,
            client_adapter_bytes=self.limits.max_client_adapter_bytes,
            hardware=describe_device(self.options.device),
            region=self.options.region,
            version=__version__,
            public_name=self.options.public_name,
            bridged=bool(self.bridging.bridge_addrs),
            reachable=self.bridging.reachable,
            bridge_addrs=self.bridging.bridge_addrs,
            bridge_node=self.bridging.is_bridge,
            available=self.load.available(),
            announced_at=time.time(),
            network_mbps=self.network_mbps,
            addrs=tuple(self.dht.visible_maddrs()[:16]),
            receipt_key=public_key_hex(self.receipt_signer),
        )

    async def _announce(self) -> bool:
        """Publishes this server's records; False (logged) when the DHT could not take them."""
        try:
            await self.dht.announce(self.model_name, self.record(), ttl=self.options.record_ttl)
            config = self.checkpoint.config
            await self.dht.announce_meta(
                self.model_name,
                ModelRecord(
                    num_blocks=self.checkpoint.num_blocks,
                    family=self.checkpoint.family.model_type,
                    config_digest=self.checkpoint.config_digest,
                    hidden_size=config.hidden_size,
                ),
                ttl=self.options.record_ttl,
            )
        except DHTUnavailableError as e:
            logger.warning("could not announce to the DHT: %s", e)
            return False
        except Exception:
            logger.warning("could not announce to the DHT; will retry", exc_info=True)
            return False
        return True

    async def _drain(self) -> None:
        """Announces `draining`, refuses new sessions, hands open ones to other servers where it can,
        and waits (bounded) for the others to finish."""
        self.state = ServerState.DRAINING
        await self._announce()
        await self._hand_over()
        await self._wait_for_sessions()

    async def _wait_for_sessions(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.options.drain_timeout
        last_announce = asyncio.get_running_loop().time()
        if self.handler.open_sessions:
            logger.info(
                "draining: waiting up to %.0f s for %d open session(s); Ctrl-C again to stop now",
                self.options.drain_timeout,
                self.handler.open_sessions,
            )
        # Sessions that could not be handed over at once (the swarm unreadable, no server with room,
        # an export that failed) are tried again, less and less often, while the drain waits.
        retry: Optional[asyncio.Task] = None
        retry_wait = HANDOVER_RETRY_S
        next_retry = last_announce + retry_wait
        try:
            while self.handler.open_sessions and not self._force_stop.is_set():
                now = asyncio.get_running_loop().time()
                if now >= deadline:
                    logger.warning("drain timeout: closing %d open session(s)", self.handler.open_sessions)
                    break
                if now - last_announce >= self.options.announce_period:
                    await self._announce()
                    last_announce = now
                if now >= next_retry and (retry is None or retry.done()) and self.handler.movable_sessions():
                    retry = asyncio.create_task(self._hand_over())
                    retry_wait = min(2 * retry_wait, HANDOVER_RETRY_MAX_S)
                    next_retry = now + retry_wait
                try:
                    await asyncio.wait_for(self._force_stop.wait(), timeout=min(0.2, deadline - now))
                except asyncio.TimeoutError:
                    pass
        finally:
            if retry is not None:
                retry.cancel()

    async def _leave(self, p2p) -> None:
        if self.tier is not None:
            try:
                await asyncio.wait_for(self._spill_prefixes(), 30)
            except Exception as e:  # Redis is a cache: leaving does not wait on it
                logger.info("kv tier: could not keep the prefix pages: %s: %s", type(e).__name__, e)
            await self.tier.close()
        if self.throughput is not None:  # it has announced itself (a server that never loaded has not)
            self.state = ServerState.OFFLINE
            if await self._announce():
                logger.info("announced offline; shutting down")
            else:
                logger.info("shutting down; this server's records expire within %.0f s", self.options.record_ttl)
        if p2p is not None:
            await p2p.shutdown()
        self.dht.shutdown()
        self.scheduler.close()
        self.compute.shutdown()
        tracing.flush()  # the last steps' spans leave before the process does


def local_host(host: str) -> str:
    """The address a local tool dials to reach a port bound on `host` (a wildcard means loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
