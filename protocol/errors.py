"""Errors that travel to the other side of an RPC as a typed reply, by who is at fault."""

from __future__ import annotations

import enum


class ErrorKind(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # the caller's fault: never retried, never bans the server
    BUSY = "busy"  # no room now: route elsewhere
    WRONG_MODEL = "wrong_model"  # the server does not serve this model or these blocks
    SERVER_ERROR = "server_error"  # the server failed: ban and reroute
    BAD_PUSH = "bad_push"  # a step the previous server of the chain pushed was refused: the pusher's fault
    EXPIRED = "expired"  # the session was closed idle (`--session-timeout`): open it again; nobody's fault


class WireError(Exception):
    """An error that travels to the other side as a typed reply."""

    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def bad_request(message: str) -> WireError:
    return WireError(ErrorKind.BAD_REQUEST, message)


class MalformedMessage(WireError):
    """A message that could not be parsed. From a client, the request is bad; from a server, the server
    is at fault (its reply is garbage), so a client routes around it."""

    def __init__(self, message: str):
        super().__init__(ErrorKind.BAD_REQUEST, message)
