"""What went wrong talking to one server, as the error that says what the caller should do: mapped
here once, for every request a client makes (sessions, stateless forwards, pings)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator

import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError

from client.errors import BadPush, BadRequestError, ServerFailure, SessionExpired, SwarmBusyError, SwarmError
from protocol.errors import ErrorKind, MalformedMessage, WireError
from protocol.tensors import all_finite

# What a failing link or peer raises: the server's fault (or its network's), never the caller's.
TRANSPORT_ERRORS = (ConnectionError, OSError, EOFError, P2PDaemonError, P2PHandlerError, asyncio.IncompleteReadError)


def to_client_error(peer_id: str, error: BaseException, bridge: str = "") -> BaseException:
    """Maps what went wrong talking to one server to the error type that says what the caller should do.

    Only what the server or the link to it did is a `ServerFailure` (ban, reroute): transport errors,
    timeouts, errors the server reports as its own, a reply that cannot be parsed, and a server that no
    longer serves what its record says (it has just moved blocks). Anything else is this process's own
    bug and is returned as it is, so that it propagates at once and bans nobody.
    """
    if isinstance(error, SwarmError):
        return error
    if isinstance(error, MalformedMessage):
        return ServerFailure(peer_id, f"malformed reply: {error.message}", bridge)
    if isinstance(error, WireError):
        if error.kind == ErrorKind.BAD_REQUEST:
            return BadRequestError(f"server {peer_id} refused the request: {error.message}", peer_id=peer_id)
        if error.kind == ErrorKind.BUSY:
            return SwarmBusyError(f"server {peer_id} is busy: {error.message}", peer_id=peer_id)
        if error.kind == ErrorKind.BAD_PUSH:
            return BadPush(peer_id, error.message, bridge)
        if error.kind == ErrorKind.EXPIRED:
            return SessionExpired(peer_id, error.message, bridge)
        if error.kind == ErrorKind.WRONG_MODEL:
            return ServerFailure(peer_id, f"serves other blocks than it announced: {error.message}", bridge)
        return ServerFailure(peer_id, error.message, bridge)
    if isinstance(error, asyncio.TimeoutError):
        return ServerFailure(peer_id, "timed out", bridge)
    if isinstance(error, TRANSPORT_ERRORS):
        return ServerFailure(peer_id, f"{type(error).__name__}: {error}", bridge)
    return error


@contextlib.contextmanager
def server_errors(peer_id: str, bridge: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Raises what `to_client_error` maps an error of the body to (the error itself, traceback kept, if
    it is ours); `bridge()` names the bridge the request went through, once it is known."""
    try:
        yield
    except Exception as error:
        mapped = to_client_error(peer_id, error, bridge())
        if mapped is error:
            raise
        raise mapped from error


def check_output(peer_id: str, output: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A span's output must have its input's shape, the announced dtype and finite values, or the server failed."""
    if output.shape != like.shape or output.dtype != dtype:
        raise ServerFailure(
            peer_id,
            f"reply of shape {list(output.shape)} and dtype {output.dtype}, expected {list(like.shape)} and {dtype}",
        )
    if not all_finite(output):
        raise ServerFailure(peer_id, "reply holds NaN or infinite values")
    return output
