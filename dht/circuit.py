"""Relayed RPC streams, for servers that nobody can dial (behind a home router's NAT).

Why not libp2p's own circuit relay: in the p2pd that hivemind 1.1.12 bundles, a relayed connection
is "limited" and the daemon opens no application stream over it (identify works, every RPC hangs),
and it cannot hole-punch. So the relaying happens one level up, over ordinary connections:

- An unreachable server dials a relay node (a bootstrap node or a reachable server) and keeps an
  *attach* stream open on it. That connection went out through the server's NAT, so it is a plain
  two-way connection: the relay node can open streams to the server over it.
- A client (or a server pushing a step) that wants one of the server's RPCs opens a *circuit* on
  the relay node: a small header names the server and the RPC; the relay node checks that the
  server is attached to it and that the RPC is one of the swarm's, opens that RPC on the server and
  copies bytes both ways, within its limits (servers attached, circuits at once, bytes and seconds
  per circuit). Unary RPCs (info, echo) are carried as one request and one reply.
- *Dial-back* tells a server whether it is reachable: a node it asks opens a TCP connection to the
  address it sees the request come from, at the ports the server listens on. Only that address:
  nobody can make a relay node connect elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable, Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dht.dialing import dial

logger = logging.getLogger(__name__)

CIRCUIT_ATTACH = "swarm.Circuit.attach"
CIRCUIT_OPEN = "swarm.Circuit.open"
CIRCUIT_DIAL_BACK = "swarm.Circuit.dial_back"
RELAYED_PREFIX = "swarm.BlockService."  # the only RPCs a circuit may carry
MAX_HEADER_BYTES = 4096
MAX_UNARY_BYTES = 1 << 20
DIAL_BACK_TIMEOUT = 3.0
OPEN_TIMEOUT = 10.0  # a relay node's wait for an attached server to accept a stream, or for a unary request
UNARY_TIMEOUT = 60.0
_COPY_BYTES = 1 << 16


class CircuitError(ConnectionError):
    """A relay node refused or lost a circuit (the target is not attached, limits, no such RPC)."""


@dataclass(frozen=True)
class RelayLimits:
    """What a relay node gives strangers: servers attached, circuits at once, and per circuit, bytes
    (both ways together) and seconds."""

    max_servers: int = 16
    max_circuits: int = 64
    max_bytes: int = 1 << 30
    max_seconds: float = 3600.0

    @classmethod
    def of(cls, options) -> "RelayLimits":
        """From a program's --relay-* options (configs.schema.NetworkOptions)."""
        return cls(
            max_servers=options.relay_max_servers,
            max_circuits=options.relay_hop_limit,
            max_bytes=int(options.relay_max_mbytes * 1e6),
            max_seconds=options.relay_max_seconds,
        )


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OpenCircuit(_Header):
    target: str = Field(min_length=1, max_length=128)
    handler: str = Field(min_length=1, max_length=128)
    unary: bool = False


class DialBack(_Header):
    ports: tuple[int, ...] = Field(min_length=1, max_length=4)


class Reply(_Header):
    ok: bool
    error: str = Field(default="", max_length=512)
    reachable: Optional[bool] = None
    observed_ip: str = Field(default="", max_length=64)


async def _send(writer: asyncio.StreamWriter, header: _Header) -> None:
    data = header.model_dump_json().encode()
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def _receive(reader: asyncio.StreamReader, model: type[_Header]) -> _Header:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_HEADER_BYTES:
        raise CircuitError(f"circuit header of {size} bytes (limit {MAX_HEADER_BYTES})")
    try:
        return model.model_validate(json.loads(await reader.readexactly(size)))
    except (ValueError, ValidationError) as e:
        raise CircuitError(f"malformed circuit header: {e}") from None


async def _send_blob(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def _receive_blob(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_UNARY_BYTES:
        raise CircuitError(f"unary message of {size} bytes (limit {MAX_UNARY_BYTES})")
    return await reader.readexactly(size)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


class CircuitRelay:
    """The relay node's side: attach, open and dial-back handlers on this node's libp2p daemon."""

    def __init__(self, p2p: P2P, limits: RelayLimits = RelayLimits(), relay: bool = True):
        self.p2p = p2p
        self.limits = limits
        self.relay = relay  # False: answers dial-backs only
        self.attached: dict[str, float] = {}  # peer id -> attached since
        self.circuits = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(CIRCUIT_DIAL_BACK, self._dial_back)
        if self.relay:
            await self.p2p.add_binary_stream_handler(CIRCUIT_ATTACH, self._attach)
            await self.p2p.add_binary_stream_handler(CIRCUIT_OPEN, self._open)

    async def _attach(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        try:
            if peer not in self.attached and len(self.attached) >= self.limits.max_servers:
                await _send(
                    writer, Reply(ok=False, error=f"this relay serves {self.limits.max_servers} servers already")
                )
                return
            self.attached[peer] = time.time()
            logger.info("server %s attached (relaying for %d)", peer, len(self.attached))
            await _send(writer, Reply(ok=True))
            while await reader.read(_COPY_BYTES):  # the server sends nothing; this ends when it goes away
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.attached.pop(peer, None) is not None:
                logger.info("server %s detached", peer)
            _close(writer)

    async def _open(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            header = await asyncio.wait_for(_receive(reader, OpenCircuit), DIAL_BACK_TIMEOUT)
            refusal = self._refusal(header)
            if refusal:
                await _send(writer, Reply(ok=False, error=refusal))
                return
            self.circuits += 1
            counted = True
            target = PeerID.from_base58(header.target)
            if header.unary:
                await _send(writer, Reply(ok=True))
                request = runtime_pb2.ExpertRequest.FromString(
                    await asyncio.wait_for(_receive_blob(reader), OPEN_TIMEOUT)
                )
                response = await asyncio.wait_for(
                    self.p2p.call_protobuf_handler(target, header.handler, request, runtime_pb2.ExpertResponse),
                    min(UNARY_TIMEOUT, self.limits.max_seconds),
                )
                await _send(writer, Reply(ok=True))
                await _send_blob(writer, response.SerializeToString())
                return
            _, their_reader, their_writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(target, header.handler), OPEN_TIMEOUT
            )
            await _send(writer, Reply(ok=True))
            try:
                # From here on the stream is the RPC's: a limit or a failure only cuts it, with no
                # reply frame that the caller would read as the RPC's bytes.
                await asyncio.wait_for(self._pipe(reader, writer, their_reader, their_writer), self.limits.max_seconds)
            except Exception as e:
                logger.info("circuit from %s to %s cut: %s: %s", info.peer_id, header.target, type(e).__name__, e)
            finally:
                _close(their_writer)
        except CircuitError as e:
            with contextlib.suppress(Exception):
                await _send(writer, Reply(ok=False, error=str(e)[:500]))
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("circuit from %s ended: %s: %s", info.peer_id, type(e).__name__, e)
        except Exception as e:
            logger.warning("circuit from %s failed: %s: %s", info.peer_id, type(e).__name__, e)
            with contextlib.suppress(Exception):
                await _send(writer, Reply(ok=False, error=f"{type(e).__name__}: {e}"[:500]))
        finally:
            if counted:
                self.circuits -= 1
            _close(writer)

    def _refusal(self, header: OpenCircuit) -> str:
        if not header.handler.startswith(RELAYED_PREFIX):
            return f"this relay carries only {RELAYED_PREFIX}* calls"
        if header.target not in self.attached:
            return f"server {header.target} is not attached to this relay"
        if self.circuits >= self.limits.max_circuits:
            return f"this relay carries {self.limits.max_circuits} circuits already"
        return ""

    async def _pipe(self, reader_a, writer_a, reader_b, writer_b) -> None:
        """Copies both ways until either side ends or the circuit's byte budget is spent."""
        budget = [self.limits.max_bytes]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(_COPY_BYTES):
                budget[0] -= len(data)
                if budget[0] < 0:
                    raise CircuitError(f"circuit passed its limit of {self.limits.max_bytes} bytes")
                sink.write(data)
                await sink.drain()

        tasks = [asyncio.create_task(copy(reader_a, writer_b)), asyncio.create_task(copy(reader_b, writer_a))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _dial_back(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_receive(reader, DialBack), DIAL_BACK_TIMEOUT)
            ip = await self._observed_ip(info.peer_id)
            if ip is None:
                await _send(writer, Reply(ok=False, error="cannot tell which address this request came from"))
                return
            results = await asyncio.gather(*(_tcp_open(ip, port) for port in request.ports))
            await _send(writer, Reply(ok=True, reachable=any(results), observed_ip=ip))
        except Exception as e:
            logger.debug("dial-back for %s failed: %s: %s", info.peer_id, type(e).__name__, e)
        finally:
            _close(writer)

    async def _observed_ip(self, peer: PeerID) -> Optional[str]:
        """The IP address of this node's connection to `peer` (what the daemon lists for it)."""
        for known in await self.p2p.list_peers():
            if known.peer_id == peer:
                for addr in known.addrs:
                    parts = str(addr).split("/")
                    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
                        return parts[2]
        return None


async def _tcp_open(ip: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), DIAL_BACK_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    _close(writer)
    return True


def split_relay_addr(addr: str) -> tuple[str, str]:
    """(relay peer id, transport address) of a relay multiaddr /ip4/…/tcp/…/p2p/<relay id>."""
    head, sep, peer = addr.rpartition("/p2p/")
    if not sep or not head or not peer or "/" in peer:
        raise ValueError(f"{addr!r} is not a relay address like /ip4/203.0.113.5/tcp/31337/p2p/Qm...")
    return peer, head


async def dial_relay(p2p: P2P, addr: str, timeout: float) -> PeerID:
    """Connects to the relay node at `addr` (a multiaddr ending with /p2p/<relay id>)."""
    relay_id, transport = split_relay_addr(addr)
    return await dial(p2p, relay_id, [transport], timeout)


def _relay_id(addr: str) -> str:
    try:
        return split_relay_addr(addr)[0]
    except ValueError:
        return addr


async def ask_dial_back(p2p: P2P, peers: Iterable[str], ports: list[int], timeout: float = 10.0) -> Optional[Reply]:
    """Asks the nodes at `peers` (full multiaddrs), in turn, whether they can dial this node back;
    the first answer, or None when none answers."""
    for addr in peers:
        try:
            peer = await dial_relay(p2p, addr, timeout)
            _, reader, writer = await asyncio.wait_for(p2p.call_binary_stream_handler(peer, CIRCUIT_DIAL_BACK), timeout)
            try:
                await _send(writer, DialBack(ports=tuple(ports[:4])))
                reply = await asyncio.wait_for(_receive(reader, Reply), timeout)
            finally:
                _close(writer)
            if reply.ok:
                return reply
            logger.info("%s could not check reachability: %s", addr, reply.error)
        except Exception as e:
            logger.info("no reachability answer from %s: %s: %s", addr, type(e).__name__, e)
    return None


class RelayAttachment:
    """Keeps an unreachable server attached to `want` relay nodes at once (so that clients can fail
    over to another as soon as one dies), topping up from `candidates` whenever one is lost and every
    `retry` seconds while fewer are held. `on_change` gets the relay addresses held after each change."""

    def __init__(
        self,
        p2p: P2P,
        candidates: Callable[[], Awaitable[list[str]]],
        on_change: Callable[[tuple[str, ...]], Awaitable[None]],
        want: int = 2,
        timeout: float = 10.0,
        retry: float = 10.0,
    ):
        self.p2p = p2p
        self.candidates = candidates
        self.on_change = on_change
        self.want = want
        self.timeout = timeout
        self.retry = retry
        self._held: dict[str, asyncio.Task] = {}  # relay address -> the task holding its attach stream
        self._failed: dict[str, float] = {}  # relay address -> when it last failed (tried last next time)
        self._lost = asyncio.Event()

    @property
    def relays(self) -> tuple[str, ...]:
        return tuple(self._held)

    async def run(self) -> None:
        try:
            while True:
                await self._top_up()
                self._lost.clear()
                wait = None if len(self._held) >= self.want else self.retry
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), wait)
                if self._lost.is_set():
                    await self.on_change(self.relays)
        finally:
            for task in self._held.values():
                task.cancel()

    async def _top_up(self) -> None:
        if len(self._held) >= self.want:
            return
        held = {_relay_id(addr) for addr in self._held}  # relay ids: a relay may announce several addresses
        candidates = [addr for addr in await self.candidates() if _relay_id(addr) not in held]
        if not candidates and not self._held:
            logger.warning("no relay node to attach to yet; this server is unreachable until one appears")
        for addr in sorted(candidates, key=lambda addr: self._failed.get(addr, 0.0)):
            if _relay_id(addr) in held:
                continue  # another address of a relay node it has just attached to
            stream = await self._attach(addr)
            if stream is None:
                continue
            logger.info("attached to relay %s", addr)
            held.add(_relay_id(addr))
            self._held[addr] = asyncio.create_task(self._hold(addr, *stream), name=f"relay {addr[-6:]}")
            await self.on_change(self.relays)
            if len(self._held) >= self.want:
                return

    async def _hold(self, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(_COPY_BYTES):  # the relay sends nothing; this ends when it goes away
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            _close(writer)
            if self._held.get(addr) is asyncio.current_task():
                del self._held[addr]
                self._failed[addr] = time.monotonic()
                logger.warning("lost relay %s; %d left, attaching to another", addr, len(self._held))
                self._lost.set()

    async def _attach(self, addr: str) -> Optional[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            peer = await dial_relay(self.p2p, addr, self.timeout)
            _, reader, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(peer, CIRCUIT_ATTACH), self.timeout
            )
            reply = await asyncio.wait_for(_receive(reader, Reply), self.timeout)
        except Exception as e:
            logger.info("relay %s unavailable: %s: %s", addr, type(e).__name__, e)
            self._failed[addr] = time.monotonic()
            return None
        if not reply.ok:
            logger.info("relay %s refused: %s", addr, reply.error)
            self._failed[addr] = time.monotonic()
            _close(writer)
            return None
        return reader, writer


@dataclass(frozen=True)
class Target:
    """How to reach one server's RPCs: directly at `addrs`, or, when `relay` is set (a relay
    multiaddr with /p2p/), through a circuit on that relay node."""

    peer_id: str
    addrs: tuple[str, ...] = ()
    relay: str = ""

    @property
    def peer(self) -> PeerID:
        return PeerID.from_base58(self.peer_id)


async def reach(p2p: P2P, peer_id: str, addrs: Iterable[str], relay_addrs: Iterable[str], timeout: float) -> Target:
    """Dials the server, or, if it announces relays, the first relay node that answers."""
    relays = list(relay_addrs)
    if not relays:
        await dial(p2p, peer_id, addrs, timeout)
        return Target(peer_id, tuple(addrs))
    errors = []
    for relay in relays:
        try:
            await dial_relay(p2p, relay, timeout)
            return Target(peer_id, tuple(addrs), relay)
        except Exception as e:
            errors.append(f"{relay}: {type(e).__name__}: {e}")
    raise CircuitError(f"no relay of {peer_id} answers ({'; '.join(errors)})")


async def _open_circuit(p2p: P2P, target: Target, handler: str, unary: bool):
    relay_id, _ = split_relay_addr(target.relay)
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(relay_id), CIRCUIT_OPEN)
    await _send(writer, OpenCircuit(target=target.peer_id, handler=handler, unary=unary))
    return reader, writer


async def iterate(p2p: P2P, target: Target, handler: str, requests: AsyncIterator) -> AsyncIterator:
    """hivemind's `iterate_protobuf_handler` (ExpertRequest in, ExpertResponse out), relayed when
    `target` says so."""
    if not target.relay:
        return await p2p.iterate_protobuf_handler(target.peer, handler, requests, runtime_pb2.ExpertResponse)
    reader, writer = await _open_circuit(p2p, target, handler, unary=False)
    try:
        reply = await _receive(reader, Reply)
    except BaseException:
        _close(writer)
        raise
    if not reply.ok:
        _close(writer)
        raise CircuitError(f"relay refused the circuit to {target.peer_id}: {reply.error}")

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    async def read() -> AsyncIterator:
        writing = asyncio.create_task(write())
        try:
            while True:
                try:
                    response, err = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                except asyncio.IncompleteReadError:
                    break
                if err is not None:
                    raise CircuitError(f"{handler} at {target.peer_id} (relayed) failed: {err.message}")
                yield response
        finally:
            writing.cancel()
            _close(writer)

    return read()


async def call(p2p: P2P, target: Target, handler: str, request) -> runtime_pb2.ExpertResponse:
    """hivemind's unary `call_protobuf_handler` (ExpertRequest → ExpertResponse), relayed when
    `target` says so."""
    if not target.relay:
        return await p2p.call_protobuf_handler(target.peer, handler, request, runtime_pb2.ExpertResponse)
    reader, writer = await _open_circuit(p2p, target, handler, unary=True)
    try:
        # Accepted first, then the request: a relay that refuses closes the stream, and a request
        # written meanwhile could make the stream reset before its refusal is read.
        for send in (True, False):
            reply = await _receive(reader, Reply)
            if not reply.ok:
                raise CircuitError(f"relay refused the circuit to {target.peer_id}: {reply.error}")
            if send:
                await _send_blob(writer, request.SerializeToString())
        return runtime_pb2.ExpertResponse.FromString(await _receive_blob(reader))
    finally:
        _close(writer)
