"""Tensors on the wire: sizes checked before allocating, bfloat16 as two bytes per value."""

from __future__ import annotations

import pytest
import torch

from protocol.errors import WireError
from protocol.messages import Step, pack, read_header
from protocol.tensors import all_finite, read_tensors


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


async def test_large_tensor_work_runs_off_the_event_loop_and_small_work_inline():
    import threading

    from protocol.tensors import OFF_LOOP_BYTES, off_loop

    here = threading.get_ident()
    assert await off_loop(threading.get_ident, OFF_LOOP_BYTES) == here
    assert await off_loop(threading.get_ident, OFF_LOOP_BYTES + 1) != here


def test_a_digest_is_of_the_bytes_in_the_tensors_own_dtype_whatever_its_layout():
    import hashlib

    from protocol.tensors import tensor_digest

    values = torch.randn(4, 6)
    strided = values.t()  # not contiguous: hashed as its contiguous copy
    assert tensor_digest(strided) == hashlib.sha256(strided.contiguous().numpy().tobytes()).hexdigest()
    half = values.to(torch.bfloat16)
    assert tensor_digest(half) == hashlib.sha256(half.view(torch.int16).numpy().tobytes()).hexdigest()
    assert tensor_digest(half) != tensor_digest(values)


async def test_a_tensor_already_on_the_device_is_not_copied_and_another_is_moved():
    from protocol.tensors import moved

    host = torch.ones(2, 3)
    assert await moved(host, "cpu") is host and await moved(None, "cpu") is None
    elsewhere = await moved(host, "meta")  # a device every machine has
    assert elsewhere.device.type == "meta" and elsewhere.shape == host.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nan_or_infinity_in_every_float_dtype_and_layout(dtype):
    clean = torch.randn(2, 5, 8).to(dtype)
    assert all_finite(clean) and all_finite(clean.transpose(1, 2)) and all_finite(clean[:, ::2])
    with torch.inference_mode():
        assert all_finite(clean * 2)  # an inference tensor, as the servers' outputs are
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = clean.clone()
        tensor[1, 4, 7] = bad
        assert not all_finite(tensor)
        assert not all_finite(tensor.transpose(1, 2)) and not all_finite(tensor[1:, 4:])
    assert all_finite(torch.empty(0, dtype=dtype))
    weights = torch.randn(3, requires_grad=True)
    assert all_finite(weights) and not all_finite(weights / 0)
