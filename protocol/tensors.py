"""Tensors on the wire: hivemind's protobuf `Tensor`, checked before anything is allocated, and the
caps on what one message may carry.

hivemind sends bfloat16 as float32 bytes (numpy has no bfloat16): twice the bytes, half of them
zeros. `serialize_tensor` sends its two bytes as they are, under a dtype of our own; both forms are read.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from protocol.errors import MalformedMessage

T = TypeVar("T")

# One message on a stream stays well below what the libp2p daemon accepts; longer inputs are chunked.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

# What one incoming stream message may declare before the stream is cut unread: twice the tensors'
# cap, so that a message a little over it is still read and refused with a clear error.
MAX_STREAM_MESSAGE_BYTES = 2 * MAX_MESSAGE_BYTES

BF16_BITS = "bfloat16_bits"
_ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 4, BF16_BITS: 2, "int64": 8, "bool": 1}


# A message whose tensors are larger than this is (de)serialized, checked and hashed on a worker thread:
# on the event loop, a long prefill's megabytes would hold up every other session's replies.
OFF_LOOP_BYTES = 1 << 20


async def off_loop(work: Callable[[], T], nbytes: int) -> T:
    """`work()`, on a worker thread if it handles more than OFF_LOOP_BYTES (a small decode step costs
    less inline than the thread hop would)."""
    if nbytes <= OFF_LOOP_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(None, work)


async def moved(tensor: Optional[torch.Tensor], device: torch.device | str) -> Optional[torch.Tensor]:
    """`tensor` on `device`. A copy between devices runs on a worker thread: a copy to host waits for
    the kernels still writing the tensor, and the event loop must not wait with it."""
    if tensor is None or tensor.device == torch.device(device):
        return tensor
    return await asyncio.get_running_loop().run_in_executor(None, tensor.to, device)


def message_bytes(message: Any) -> int:
    """The tensor bytes a request or reply carries (its header is capped separately)."""
    return sum(len(tensor.buffer) for tensor in message.tensors)


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in its own dtype (bfloat16 included), on any device: a GPU tensor
    is copied to host first (which waits for the kernels that write it); a host tensor is hashed in
    place, without a copy."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite (no NaN, no infinity). A float tensor in host memory is checked
    through numpy, 3-6 times faster than torch's `isfinite().all()` on a step's rows and on a prompt's
    megabytes alike: both ends check every step."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float16, torch.float64):
        return bool(np.isfinite(tensor.detach().numpy()).all())
    return bool(torch.isfinite(tensor).all())


def read_tensors(message: Any, max_count: int, max_bytes: int = MAX_MESSAGE_BYTES) -> list[torch.Tensor]:
    """Deserializes a message's tensors after checking their declared sizes, dtypes and count."""
    if len(message.tensors) > max_count:
        raise MalformedMessage(f"expected at most {max_count} tensors, got {len(message.tensors)}")
    total = 0
    for proto in message.tensors:
        if proto.dtype not in _ELEMENT_SIZE:
            raise MalformedMessage(f"unsupported tensor dtype {proto.dtype!r}")
        if len(proto.size) > 4 or any(dim < 0 for dim in proto.size):
            raise MalformedMessage(f"unsupported tensor shape {list(proto.size)}")
        if proto.compression != runtime_pb2.CompressionType.NONE:
            raise MalformedMessage("compressed tensors are not accepted")
        expected = math.prod(proto.size) * _ELEMENT_SIZE[proto.dtype]
        if expected != len(proto.buffer):
            raise MalformedMessage(
                f"tensor of shape {list(proto.size)} has {len(proto.buffer)} bytes, expected {expected}"
            )
        total += expected
    if total > max_bytes:
        raise MalformedMessage(f"message carries {total} bytes of tensors, limit is {max_bytes}")
    return [deserialize_tensor(proto) for proto in message.tensors]


def serialize_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    if tensor.dtype != torch.bfloat16:
        return serialize_torch_tensor(tensor)
    proto = serialize_torch_tensor(tensor.contiguous().view(torch.int16))
    proto.dtype = BF16_BITS
    return proto


def deserialize_tensor(proto: runtime_pb2.Tensor) -> torch.Tensor:
    if proto.dtype != BF16_BITS:
        return deserialize_torch_tensor(proto)
    bits = (
        torch.frombuffer(bytearray(proto.buffer), dtype=torch.int16)
        if proto.buffer
        else torch.empty(0, dtype=torch.int16)
    )
    return bits.view(torch.bfloat16).reshape(list(proto.size))


class MessageTooLarge(ValueError):
    """A peer declared a stream message longer than MAX_STREAM_MESSAGE_BYTES."""


async def _receive_capped(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > MAX_STREAM_MESSAGE_BYTES:
        raise MessageTooLarge(f"a peer declared a {length}-byte message; at most {MAX_STREAM_MESSAGE_BYTES} are read")
    return await reader.readexactly(length)


def cap_incoming_messages() -> None:
    """Makes this process refuse a stream message whose declared length is over the cap before
    reading any of it. hivemind's reader would otherwise buffer whatever length a peer declares
    (up to 2^64 bytes) before `read_tensors` could check a thing; the stream is closed instead."""
    P2P.receive_raw_data = staticmethod(_receive_capped)
