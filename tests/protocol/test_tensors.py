"""Tensors on the wire: sizes checked before allocating, bfloat16 as two bytes per value."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import WireError
from protocol.messages import Step, pack, read_header
from protocol.tensors import read_tensors


def test_wire_checks_sizes_before_allocating():
    message = pack(Step(position=1), [torch.zeros(1, 2, 4)], request=True)
    assert read_header(message, Step).position == 1
    message.tensors[0].size[:] = [1000, 1000, 1000]
    with pytest.raises(WireError, match="expected 4000000000$"):
        read_tensors(message, max_count=1)
    with pytest.raises(WireError, match="at most 1 tensors"):
        read_tensors(pack(None, [torch.zeros(1), torch.zeros(1)], request=True), max_count=1)
    with pytest.raises(WireError, match="position"):
        read_header(pack(Step(position=0), request=True).__class__(metadata=b"\x81\xa8position\xa1x"), Step)


def test_bfloat16_travels_as_two_bytes_per_value_and_the_four_byte_form_is_still_read():
    from hivemind.compression import serialize_torch_tensor

    values = torch.randn(2, 3, 8).to(torch.bfloat16)
    message = pack(Step(position=0), [values], request=True)
    assert len(message.tensors[0].buffer) == values.numel() * 2
    (read,) = read_tensors(message, max_count=1)
    assert read.dtype == torch.bfloat16 and torch.equal(read, values)
    message.tensors[0].CopyFrom(serialize_torch_tensor(values))  # what hivemind's serializer sends: fp32 bytes
    assert len(message.tensors[0].buffer) == values.numel() * 4
    (read,) = read_tensors(message, max_count=1)
    assert read.dtype == torch.bfloat16 and torch.equal(read, values)
    message = pack(Step(position=0), [values], request=True)
    message.tensors[0].buffer = message.tensors[0].buffer[:-2]
    with pytest.raises(WireError, match="expected 96$"):
        read_tensors(message, max_count=1)
