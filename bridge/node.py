"""The bridge's side: attach, open and dial-back handlers on this node's libp2p daemon, within limits
a stranger cannot push past (servers attached, circuits at once, bytes and seconds per circuit)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from bridge.frames import (
    CARRIED_PREFIX,
    CIRCUIT_ATTACH,
    CIRCUIT_DIAL_BACK,
    CIRCUIT_OPEN,
    COPY_BYTES,
    DIAL_BACK_TIMEOUT,
    CircuitError,
    DialBack,
    OpenCircuit,
    Reply,
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

    @classmethod
    def of(cls, options) -> "BridgeLimits":
        """From a program's --bridge-* options (configs.schema.NetworkOptions)."""
        return cls(
            max_servers=options.bridge_max_servers,
            max_circuits=options.bridge_max_circuits,
            max_bytes=int(options.bridge_max_mbytes * 1e6),
            max_seconds=options.bridge_max_seconds,
        )


class BridgeNode:
    """Answers dial-backs and, with `carry` (the default), attaches unreachable servers and carries
    circuits to them."""

    def __init__(self, p2p: P2P, limits: BridgeLimits = BridgeLimits(), carry: bool = True):
        self.p2p = p2p
        self.limits = limits
        self.carry = carry  # False: answers dial-backs only
        self.attached: dict[str, float] = {}  # peer id -> attached since
        self.circuits = 0

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(CIRCUIT_DIAL_BACK, self._dial_back)
        if self.carry:
            await self.p2p.add_binary_stream_handler(CIRCUIT_ATTACH, self._attach)
            await self.p2p.add_binary_stream_handler(CIRCUIT_OPEN, self._open)

    async def _attach(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = info.peer_id.to_base58()
        try:
            if peer not in self.attached and len(self.attached) >= self.limits.max_servers:
                refusal = f"this bridge serves {self.limits.max_servers} servers already"
                await send(writer, Reply(ok=False, error=refusal))
                return
            self.attached[peer] = time.time()
            logger.info("server %s attached (bridging for %d)", peer, len(self.attached))
            await send(writer, Reply(ok=True))
            while await reader.read(COPY_BYTES):  # the server sends nothing; this ends when it goes away
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.attached.pop(peer, None) is not None:
                logger.info("server %s detached", peer)
            close(writer)

    async def _open(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            header = await asyncio.wait_for(receive(reader, OpenCircuit), DIAL_BACK_TIMEOUT)
            refusal = self._refusal(header)
            if refusal:
                await send(writer, Reply(ok=False, error=refusal))
                return
            self.circuits += 1
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
            close(writer)

    def _refusal(self, header: OpenCircuit) -> str:
        if not header.handler.startswith(CARRIED_PREFIX):
            return f"this bridge carries only {CARRIED_PREFIX}* calls"
        if header.target not in self.attached:
            return f"server {header.target} is not attached to this bridge"
        if self.circuits >= self.limits.max_circuits:
            return f"this bridge carries {self.limits.max_circuits} circuits already"
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
