"""Bundles carry several channels' messages as one, tensors and all, and refuse what does not add up."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from protocol.bundles import pack_bundle, part_of, unpack_bundle
from protocol.errors import ErrorKind, MalformedMessage, WireError
from protocol.messages import Step, error_response, pack
from protocol.tensors import read_tensors


def test_parts_come_back_in_order_with_their_own_headers_and_tensors():
    first = pack(Step(position=3), [torch.arange(6.0).view(1, 2, 3)], request=True)
    second = pack(Step(position=9), [torch.ones(1, 1, 3), torch.zeros(1, 4, dtype=torch.int64)], request=True)
    parts = [
        part_of(1, first, open="rpc.a"),
        part_of(2, None, end=True),
        part_of(7, second, end=True),
    ]
    bundle = pack_bundle(parts, request=True)
    assert isinstance(bundle, runtime_pb2.ExpertRequest) and len(bundle.tensors) == 3

    unpacked = unpack_bundle(bundle, request=True)

    assert [(part.channel, part.open, part.end) for part, _ in unpacked] == [
        (1, "rpc.a", False),
        (2, "", True),
        (7, "", True),
    ]
    assert unpacked[1][1] is None
    for (_, sent), (_, received) in zip([parts[0], parts[2]], [unpacked[0], unpacked[2]]):
        assert isinstance(received, runtime_pb2.ExpertRequest)
        assert received.metadata == sent.metadata
        for a, b in zip(read_tensors(received, max_count=2), read_tensors(sent, max_count=2)):
            assert torch.equal(a, b)


def test_reply_bundles_hold_replies_and_an_error_reply_is_raised_as_what_it_says():
    reply = pack(None, [torch.ones(2)], request=False)
    unpacked = unpack_bundle(pack_bundle([part_of(4, reply)], request=False), request=False)
    assert isinstance(unpacked[0][1], runtime_pb2.ExpertResponse)

    with pytest.raises(WireError) as raised:
        unpack_bundle(error_response(WireError(ErrorKind.BUSY, "full")), request=False)
    assert raised.value.kind == ErrorKind.BUSY and raised.value.message == "full"


def _bundle(header, tensors=0) -> runtime_pb2.ExpertRequest:
    message = pack(None, [torch.ones(1)] * tensors, request=True)
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb(header, use_bin_type=True), tensors=message.tensors)


@pytest.mark.parametrize(
    "bundle, says",
    [
        (runtime_pb2.ExpertRequest(metadata=b"\xc1"), "not valid msgpack"),
        (_bundle({"parts": []}), "parts"),
        (_bundle({"parts": [{"channel": 0}]}), "channel"),
        (_bundle({"parts": [{"channel": 1, "metadata": b"", "tensors": 1}]}, tensors=2), "other than its 2 tensors"),
        (_bundle({"parts": [{"channel": 1, "tensors": 1}]}, tensors=1), "without a message claims tensors"),
        (runtime_pb2.ExpertRequest(metadata=b"\x90" * (4 * 1024 * 1024 + 1)), "exceeds"),
        (_bundle({"error": "busy", "message": "an error where a request belongs"}), "parts"),
    ],
)
def test_a_bundle_that_does_not_add_up_is_malformed(bundle, says):
    with pytest.raises(MalformedMessage, match=says):
        unpack_bundle(bundle, request=True)
