"""The bridge's side: attach, open and dial-back handlers on this node's libp2p daemon, within limits
a stranger cannot push past (servers attached, circuits at once and per source, bytes and seconds
per circuit).

A bridge is not an open proxy: it carries only the swarm's own RPCs, and only to servers that prove
they serve the swarm. A server attaching names its model and first block; until its DHT record
there (signed by its identity) lists this bridge among its bridge addresses, it is *unproven*: few
unproven servers are attached at once (a newcomer detaches the oldest of them), circuits to one are
refused until the proof is found, and one that stays unproven for `proof_seconds` is detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, Collection, Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from bridge.frames import (
    CIRCUIT_ATTACH,
    CIRCUIT_DIAL_BACK,
    CIRCUIT_OPEN,
    COPY_BYTES,
    DIAL_BACK_TIMEOUT,
    Attach,
    CircuitError,
    DialBack,
    OpenCircuit,
    Reply,
    bridge_id,
    close,
    receive,
    receive_blob,
    send,
    send_blob,
)

logger = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0  # a bridge's wait for an attached server to accept a stream, or for a unary request
UNARY_TIMEOUT = 60.0


@dataclass(frozen=True)
class BridgeLimits:
    """What a bridge gives strangers: servers attached, circuits at once, and per circuit, bytes
    (both ways together) and seconds."""

    max_servers: int = 16
    max_circuits: int = 64
    max_bytes: int = 1 << 30
    max_seconds: float = 3600.0
    max_circuits_per_source: int = 8  # circuits one caller may have open through this bridge at once
    max_unproven: int = 4  # attached servers whose DHT record does not name this bridge yet (oldest go first)
    proof_seconds: float = 90.0  # how long an attached server may stay unproven

    @classmethod
    def of(cls, options) -> "BridgeLimits":
        """From a program's --bridge-* options (configs.schema.NetworkOptions)."""
        return cls(
            max_servers=options.bridge_max_servers,
            max_circuits=options.bridge_max_circuits,
            max_bytes=int(options.bridge_max_mbytes * 1e6),
            max_seconds=options.bridge_max_seconds,
            max_circuits_per_source=options.bridge_max_circuits_per_source,
        )


# Does peer `peer` announce blocks of `model` from `start_block` on with this bridge in its bridge addresses?
Proof = Callable[[str, str, int], Awaitable[bool]]
PROOF_RETRY = 3.0  # seconds between looks at an unproven server's record


class BridgeNode:
    """Answers dial-backs and, with `carry` (the default), attaches unreachable servers that `prove`
    they serve the swarm and carries circuits of the `carried` RPCs to them."""

    def __init__(
        self,
        p2p: P2P,
        carried: Collection[str],
        prove: Proof,
        limits: BridgeLimits = BridgeLimits(),
        carry: bool = True,
    ):
        self.p2p = p2p
        self.carried = frozenset(carried)
        self.prove = prove
        self.limits = limits
        self.carry = carry  # False: answers dial-backs only
        self.attached: dict[str, float] = {}  # peer id -> attached since
        self.claims: dict[str, Attach] = {}  # peer id -> what it says it serves
        self.proven: set[str] = set()
        self._writers: dict[str, asyncio.StreamWriter] = {}  # peer id -> its attach stream
        self.circuits = 0
        self.by_source: Counter[str] = Counter()

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(CIRCUIT_DIAL_BACK, self._dial_back)
        if self.carry:
            await self.p2p.add_binary_stream_handler(CIRCUIT_ATTACH, self._attach)
            await self.p2p.add_binary_stream_handler(CIRCUIT_OPEN, self._open)

    async def _attach(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        prover: Optional[asyncio.Task] = None
        try:
            claim = await asyncio.wait_for(receive(reader, Attach), DIAL_BACK_TIMEOUT)
            unproven = sorted((since, other) for other, since in self.attached.items() if other not in self.proven)
            if len(unproven) >= self.limits.max_unproven and unproven:
                # Room for a newcomer (an honest one proves itself within seconds): the oldest
                # unproven attachment goes, so strangers that never prove anything cannot hold the slots.
                evicted = unproven[0][1]
                logger.info("detaching %s, still unproven, to make room for %s", evicted, peer)
                close(self._writers.pop(evicted))
                self.attached.pop(evicted, None)
            refusal = ""
            if peer in self.attached:
                refusal = "this server is attached here already"
            elif len(self.attached) >= self.limits.max_servers:
                refusal = f"this bridge serves {self.limits.max_servers} servers already"
            if refusal:
                await send(writer, Reply(ok=False, error=refusal))
                return
            self.attached[peer] = time.time()
            self.claims[peer] = claim
            self._writers[peer] = writer
            logger.info("server %s attached (bridging for %d)", peer, len(self.attached))
            await send(writer, Reply(ok=True))
            prover = asyncio.create_task(self._await_proof(peer, writer))
            while await reader.read(COPY_BYTES):  # the server sends nothing; this ends when it goes away
                pass
        except (CircuitError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if prover is not None:
                prover.cancel()
            if self._writers.get(peer) is writer:
                del self._writers[peer]
                self.claims.pop(peer, None)
                self.proven.discard(peer)
                if self.attached.pop(peer, None) is not None:
                    logger.info("server %s detached", peer)
            close(writer)

    async def _is_proven(self, peer: str) -> bool:
        """Whether `peer`'s record names this bridge now (looked up until it does, then remembered)."""
        if peer in self.proven:
            return True
        claim = self.claims.get(peer)
        try:
            proven = claim is not None and await self.prove(peer, claim.model, claim.start_block)
        except Exception as e:  # a DHT that cannot be read proves nothing, this time
            logger.info("could not look up the record of %s: %s: %s", peer, type(e).__name__, e)
            proven = False
        if proven and peer in self.attached:
            self.proven.add(peer)
        return proven

    async def _await_proof(self, peer: str, writer: asyncio.StreamWriter) -> None:
        """Detaches `peer` unless its record names this bridge within `proof_seconds`."""
        deadline = time.monotonic() + self.limits.proof_seconds
        while not await self._is_proven(peer):
            if time.monotonic() >= deadline:
                logger.info("server %s announced no record through this bridge in time; detaching it", peer)
                close(writer)
                return
            await asyncio.sleep(PROOF_RETRY)

    async def _open(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        source = info.peer_id.to_base58()
        try:
            header = await asyncio.wait_for(receive(reader, OpenCircuit), DIAL_BACK_TIMEOUT)
            refusal = await self._refusal(header, source)
            if refusal:
                await send(writer, Reply(ok=False, error=refusal))
                return
            self.circuits += 1
            self.by_source[source] += 1
            counted = True
            target = PeerID.from_base58(header.target)
            if header.unary:
                await send(writer, Reply(ok=True))
                request = runtime_pb2.ExpertRequest.FromString(
                    await asyncio.wait_for(receive_blob(reader), OPEN_TIMEOUT)
                )
                response = await asyncio.wait_for(
                    self.p2p.call_protobuf_handler(target, header.handler, request, runtime_pb2.ExpertResponse),
                    min(UNARY_TIMEOUT, self.limits.max_seconds),
                )
                await send(writer, Reply(ok=True))
                await send_blob(writer, response.SerializeToString())
                return
            _, their_reader, their_writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(target, header.handler), OPEN_TIMEOUT
            )
            await send(writer, Reply(ok=True))
            try:
                # From here on the stream is the RPC's: a limit or a failure only cuts it, with no
                # reply frame that the caller would read as the RPC's bytes.
                await asyncio.wait_for(self._pipe(reader, writer, their_reader, their_writer), self.limits.max_seconds)
            except Exception as e:
                logger.info("circuit from %s to %s cut: %s: %s", info.peer_id, header.target, type(e).__name__, e)
            finally:
                close(their_writer)
        except CircuitError as e:
            with contextlib.suppress(Exception):
                await send(writer, Reply(ok=False, error=str(e)[:500]))
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
            logger.debug("circuit from %s ended: %s: %s", info.peer_id, type(e).__name__, e)
        except Exception as e:
            logger.warning("circuit from %s failed: %s: %s", info.peer_id, type(e).__name__, e)
            with contextlib.suppress(Exception):
                await send(writer, Reply(ok=False, error=f"{type(e).__name__}: {e}"[:500]))
        finally:
            if counted:
                self.circuits -= 1
                self.by_source[source] -= 1
                if self.by_source[source] <= 0:
                    del self.by_source[source]
            close(writer)

    async def _refusal(self, header: OpenCircuit, source: str) -> str:
        if header.handler not in self.carried:
            return f"this bridge carries only the swarm's RPCs, not {header.handler!r}"
        if header.target not in self.attached:
            return f"server {header.target} is not attached to this bridge"
        if self.circuits >= self.limits.max_circuits:
            return f"this bridge carries {self.limits.max_circuits} circuits already"
        if self.by_source[source] >= self.limits.max_circuits_per_source:
            return f"this bridge carries {self.limits.max_circuits_per_source} circuits of yours already"
        if not await self._is_proven(header.target):
            return f"server {header.target} has not announced a record that names this bridge"
        return ""

    async def _pipe(self, reader_a, writer_a, reader_b, writer_b) -> None:
        """Copies both ways until either side ends or the circuit's byte budget is spent."""
        budget = [self.limits.max_bytes]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(COPY_BYTES):
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
            request = await asyncio.wait_for(receive(reader, DialBack), DIAL_BACK_TIMEOUT)
            ip = await self._observed_ip(info.peer_id)
            if ip is None:
                await send(writer, Reply(ok=False, error="cannot tell which address this request came from"))
                return
            results = await asyncio.gather(*(_tcp_open(ip, port) for port in request.ports))
            await send(writer, Reply(ok=True, reachable=any(results), observed_ip=ip))
        except Exception as e:
            logger.debug("dial-back for %s failed: %s: %s", info.peer_id, type(e).__name__, e)
        finally:
            close(writer)

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
    close(writer)
    return True


def swarm_membership(dht, own_peer_id: str) -> Proof:
    """The proof a bridge asks of a server it carries circuits to: the server's record for `model`'s
    block `start_block` in the DHT `dht` (a `dht.swarm_dht.SwarmDHT`; records are signed by their
    server's identity) names this bridge, `own_peer_id`, among its bridge addresses."""

    async def prove(peer: str, model: str, start_block: int) -> bool:
        info = (await dht.fetch_block(model, start_block)).get(peer)
        return info is not None and any(bridge_id(addr) == own_peer_id for addr in info.record.bridge_addrs)

    return prove
