"""What the three roles around a bridge share: protocol names, limits on headers, the typed headers
and their length-prefixed framing, and bridge addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Optional

from hivemind.p2p import P2P, PeerID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dht.dialing import dial

# libp2p protocol names (on the wire: peers of every version must agree on them).
CIRCUIT_ATTACH = "swarm.Circuit.attach"
CIRCUIT_OPEN = "swarm.Circuit.open"
CIRCUIT_DIAL_BACK = "swarm.Circuit.dial_back"
MAX_HEADER_BYTES = 4096
MAX_UNARY_BYTES = 1 << 20
DIAL_BACK_TIMEOUT = 3.0
COPY_BYTES = 1 << 16


class CircuitError(ConnectionError):
    """A bridge refused or lost a circuit (the target is not attached or not proven, limits, an RPC
    it does not carry)."""


class _Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attach(_Header):
    """From a server attaching: the model and first block it serves, where its DHT record (signed by
    its identity) must name this bridge among its bridge addresses."""

    model: str = Field(min_length=1, max_length=160)
    start_block: int = Field(ge=0, le=1 << 16)


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


async def send(writer: asyncio.StreamWriter, header: _Header) -> None:
    data = header.model_dump_json().encode()
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def receive(reader: asyncio.StreamReader, model: type[_Header]) -> _Header:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_HEADER_BYTES:
        raise CircuitError(f"circuit header of {size} bytes (limit {MAX_HEADER_BYTES})")
    try:
        return model.model_validate(json.loads(await reader.readexactly(size)))
    except (ValueError, ValidationError) as e:
        raise CircuitError(f"malformed circuit header: {e}") from None


async def send_blob(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def receive_blob(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_UNARY_BYTES:
        raise CircuitError(f"unary message of {size} bytes (limit {MAX_UNARY_BYTES})")
    return await reader.readexactly(size)


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def split_bridge_addr(addr: str) -> tuple[str, str]:
    """(bridge peer id, transport address) of a bridge multiaddr /ip4/…/tcp/…/p2p/<bridge id>."""
    head, sep, peer = addr.rpartition("/p2p/")
    if not sep or not head or not peer or "/" in peer:
        raise ValueError(f"{addr!r} is not a bridge address like /ip4/203.0.113.5/tcp/31337/p2p/Qm...")
    return peer, head


def bridge_id(addr: str) -> str:
    """The peer id of a bridge address (the address itself if it is not one)."""
    try:
        return split_bridge_addr(addr)[0]
    except ValueError:
        return addr


async def dial_bridge(p2p: P2P, addr: str, timeout: float) -> PeerID:
    """Connects to the bridge at `addr` (a multiaddr ending with /p2p/<bridge id>)."""
    peer, transport = split_bridge_addr(addr)
    return await dial(p2p, peer, [transport], timeout)
