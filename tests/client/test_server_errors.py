"""Only the server's fault is the server's fault: how a client classifies what went wrong on one span."""

from __future__ import annotations

import asyncio

import pytest
import torch

from client.errors import BadRequestError, ServerFailure, SessionExpired, SwarmBusyError
from client.server_errors import check_output, to_client_error
from protocol.errors import ErrorKind, MalformedMessage, WireError


@pytest.mark.parametrize(
    "error, expected",
    [
        (ConnectionResetError("reset by peer"), ServerFailure),
        (asyncio.TimeoutError(), ServerFailure),
        (MalformedMessage("header is not valid msgpack"), ServerFailure),  # the server's reply is garbage
        (WireError(ErrorKind.SERVER_ERROR, "CUDA error"), ServerFailure),
        (WireError(ErrorKind.WRONG_MODEL, "blocks 0:2 requested, this server has 4:6"), ServerFailure),  # it moved
        (WireError(ErrorKind.BUSY, "cache full"), SwarmBusyError),
        (WireError(ErrorKind.BAD_REQUEST, "length 999 exceeds"), BadRequestError),  # the server says we are wrong
        (WireError(ErrorKind.EXPIRED, "session idle for more than 300 s"), SessionExpired),  # open it again
    ],
)
def test_errors_of_the_server_or_its_link_are_server_failures(error, expected):
    assert isinstance(to_client_error("QmPeer", error), expected)


@pytest.mark.parametrize("error", [RuntimeError("a bug here"), TypeError("bad argument"), KeyError("k")])
def test_a_local_exception_is_not_blamed_on_the_server(error):
    assert to_client_error("QmPeer", error) is error


def test_replies_of_the_wrong_shape_dtype_or_values_are_server_failures():
    like = torch.zeros(1, 3, 8)
    assert check_output("QmPeer", torch.ones(1, 3, 8), like, torch.float32) is not None
    for bad in (
        torch.ones(1, 2, 8),
        torch.ones(1, 3, 8, dtype=torch.float64),
        torch.full((1, 3, 8), float("nan")),
        torch.full((1, 3, 8), float("inf")),
    ):
        with pytest.raises(ServerFailure):
            check_output("QmPeer", bad, like, torch.float32)
