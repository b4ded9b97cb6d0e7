"""The callers' side: reaching one server's RPCs directly, or through a circuit on one of its bridges."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from bridge.frames import (
    CIRCUIT_OPEN,
    CircuitError,
    OpenCircuit,
    Reply,
    close,
    dial_bridge,
    receive,
    receive_blob,
    send,
    send_blob,
    split_bridge_addr,
)
from dht.dialing import dial


@dataclass(frozen=True)
class Target:
    """How to reach one server's RPCs: directly at `addrs`, or, when `bridge` is set (a bridge
    multiaddr with /p2p/), through a circuit on that bridge."""

    peer_id: str
    addrs: tuple[str, ...] = ()
    bridge: str = ""

    @property
    def peer(self) -> PeerID:
        return PeerID.from_base58(self.peer_id)


async def reach(p2p: P2P, peer_id: str, addrs: Iterable[str], bridge_addrs: Iterable[str], timeout: float) -> Target:
    """Dials the server, or, if it announces bridges, the first bridge that answers."""
    bridges = list(bridge_addrs)
    if not bridges:
        await dial(p2p, peer_id, addrs, timeout)
        return Target(peer_id, tuple(addrs))
    errors = []
    for bridge in bridges:
        try:
            await dial_bridge(p2p, bridge, timeout)
            return Target(peer_id, tuple(addrs), bridge)
        except Exception as e:
            errors.append(f"{bridge}: {type(e).__name__}: {e}")
    raise CircuitError(f"no bridge of {peer_id} answers ({'; '.join(errors)})")


async def _open_circuit(p2p: P2P, target: Target, handler: str, unary: bool):
    peer, _ = split_bridge_addr(target.bridge)
    _, reader, writer = await p2p.call_binary_stream_handler(PeerID.from_base58(peer), CIRCUIT_OPEN)
    await send(writer, OpenCircuit(target=target.peer_id, handler=handler, unary=unary))
    return reader, writer


async def iterate(p2p: P2P, target: Target, handler: str, requests: AsyncIterator) -> AsyncIterator:
    """hivemind's `iterate_protobuf_handler` (ExpertRequest in, ExpertResponse out), bridged when
    `target` says so."""
    if not target.bridge:
        return await p2p.iterate_protobuf_handler(target.peer, handler, requests, runtime_pb2.ExpertResponse)
    reader, writer = await _open_circuit(p2p, target, handler, unary=False)
    try:
        reply = await receive(reader, Reply)
    except BaseException:
        close(writer)
        raise
    if not reply.ok:
        close(writer)
        raise CircuitError(f"the bridge refused the circuit to {target.peer_id}: {reply.error}")

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
                    raise CircuitError(f"{handler} at {target.peer_id} (bridged) failed: {err.message}")
                yield response
        finally:
            writing.cancel()
            close(writer)

    return read()


async def call(p2p: P2P, target: Target, handler: str, request) -> runtime_pb2.ExpertResponse:
    """hivemind's unary `call_protobuf_handler` (ExpertRequest → ExpertResponse), bridged when
    `target` says so."""
    if not target.bridge:
        return await p2p.call_protobuf_handler(target.peer, handler, request, runtime_pb2.ExpertResponse)
    reader, writer = await _open_circuit(p2p, target, handler, unary=True)
    try:
        # Accepted first, then the request: a bridge that refuses closes the stream, and a request
        # written meanwhile could make the stream reset before its refusal is read.
        for send in (True, False):
            reply = await receive(reader, Reply)
            if not reply.ok:
                raise CircuitError(f"the bridge refused the circuit to {target.peer_id}: {reply.error}")
            if send:
                await send_blob(writer, request.SerializeToString())
        return runtime_pb2.ExpertResponse.FromString(await receive_blob(reader))
    finally:
        close(writer)
