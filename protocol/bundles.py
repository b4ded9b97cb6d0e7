"""Bundles: the messages of many RPC streams between two peers, carried as one message.

Every message on a libp2p stream costs a write to the local daemon, a hop between the daemons and a
read on the other side, each waking another process; with sixteen sessions on a chain that was a
millisecond a message, on the critical path of every round. A bundle carries each logical stream (a
*channel*: one session, one push stream) as parts of one message, so a round's steps to a server, a
server's pushes to the next one and its replies to the client each cost one message per hop.

A bundle is an `ExpertRequest` (or `ExpertResponse`) whose msgpack header lists its parts, in order,
and whose tensors are the parts' tensors one after the other. A part names its channel; the first
part of a channel names the RPC the channel runs (`open`), as a stream's protocol id would.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import msgpack
from hivemind.proto import runtime_pb2
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import MalformedMessage
from protocol.messages import read_header

# Parts in one bundle, and the size of its header (each part's own header is capped as a message's is).
MAX_PARTS = 1024
MAX_BUNDLE_HEADER_BYTES = 4 * 1024 * 1024
# Tensors one part may carry: an opening message carries a client adapter's pairs of every block.
MAX_PART_TENSORS = 1 + 2 * 7 * 4096


class Part(BaseModel):
    """One channel's share of a bundle: a message (its header in `metadata`, and `tensors` of the
    bundle's tensors), the end of the channel, or both."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    channel: int = Field(ge=1, lt=2**31)
    # On a channel's first part: the RPC it runs (a request only).
    open: str = Field(default="", max_length=128)
    # The message's header; None: the part carries no message. Its reader caps it as any message's
    # (`protocol.messages.MAX_HEADER_BYTES`), so that one oversized header fails its own channel, not the bundle.
    metadata: Optional[bytes] = None
    tensors: int = Field(default=0, ge=0, le=MAX_PART_TENSORS)
    # A request: the caller sends nothing more on the channel (as a stream's end); a reply: the channel's last.
    end: bool = False


class BundleHeader(BaseModel):
    """A bundle's header: its parts, in order."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    parts: tuple[Part, ...] = Field(min_length=1, max_length=MAX_PARTS)


def part_of(channel: int, message: Any = None, **fields) -> tuple[Part, Any]:
    """The part that carries `message` (or none) on `channel`, with the message."""
    if message is None:
        return Part(channel=channel, **fields), None
    return Part(channel=channel, metadata=message.metadata, tensors=len(message.tensors), **fields), message


def pack_bundle(parts: Sequence[tuple[Part, Any]], *, request: bool) -> Any:
    """One message carrying `parts` (each a `Part` and the message it carries, or None)."""
    header = msgpack.packb({"parts": [part.model_dump(exclude_defaults=True) for part, _ in parts]}, use_bin_type=True)
    tensors = [tensor for _, message in parts if message is not None for tensor in message.tensors]
    if request:
        return runtime_pb2.ExpertRequest(uid="", tensors=tensors, metadata=header)
    return runtime_pb2.ExpertResponse(tensors=tensors, metadata=header)


def unpack_bundle(bundle: Any, *, request: bool) -> list[tuple[Part, Any]]:
    """The parts of a bundle, each with the message it carries (None where it carries none), checked:
    a header that does not parse or parts that do not account for the tensors exactly is a
    `MalformedMessage`; a reply that is an error (no bundle) is raised as the `WireError` it is."""
    parts = read_header(bundle, BundleHeader, MAX_BUNDLE_HEADER_BYTES, error_replies=not request).parts
    if sum(part.tensors for part in parts) != len(bundle.tensors):
        raise MalformedMessage(f"bundle parts claim other than its {len(bundle.tensors)} tensors")
    kind = runtime_pb2.ExpertRequest if request else runtime_pb2.ExpertResponse
    unpacked, taken = [], 0
    for part in parts:
        if part.metadata is None:
            if part.tensors:
                raise MalformedMessage("a bundle part without a message claims tensors")
            unpacked.append((part, None))
            continue
        message = kind(metadata=part.metadata, tensors=bundle.tensors[taken : taken + part.tensors])
        taken += part.tensors
        unpacked.append((part, message))
    return unpacked
