"""Errors a client can act on, by who is at fault and what to do next."""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error the client raises."""


class MissingBlocksError(SwarmError):
    """No usable server announces these blocks of the model."""

    def __init__(self, model: str, blocks: list[int], condition: str = ""):
        """`condition`: what the servers had to satisfy (e.g. "with quantization none"), if anything."""
        self.model = model
        self.blocks = blocks
        where = f" {condition}" if condition else ""
        super().__init__(f"no server of model {model!r}{where} serves block(s) {_ranges(blocks)}")


class ModelMismatchError(SwarmError):
    """The swarm serves a different model under this name than the checkpoint the client loaded."""


class SwarmBusyError(SwarmError):
    """A server (`peer_id`), or every server that could serve a span, refused for lack of room; try later."""

    def __init__(self, message: str, peer_id: str | None = None):
        self.peer_id = peer_id
        super().__init__(message)


class BadRequestError(SwarmError):
    """A server (`peer_id`), or every server that could serve a span, refused the request itself (wrong
    shape, too long for it...). A session too long for one server goes to another that can hold it; this
    error means none can, or that the request is wrong anywhere."""

    def __init__(self, message: str, peer_id: str | None = None):
        self.peer_id = peer_id
        super().__init__(message)


class RetriesExhaustedError(SwarmError):
    """Every attempt to find a working chain failed; the message names the last cause."""


class StepTimeoutError(SwarmError):
    """One step (or one stateless forward) did not finish within `step_timeout`, retries included."""


class ServerProvenWrongError(SwarmError):
    """A spot check proved that a server of this session returned wrong results: the session's
    outputs after the position named are void (`generate()` handles this itself)."""


class WrongResultWarning(UserWarning):
    """Tokens already streamed came from a server since proven wrong; they are generated again."""


class ServerFailure(SwarmError):
    """A server failed, timed out or disconnected."""

    def __init__(self, peer_id: str, message: str, bridge: str = ""):
        self.peer_id = peer_id
        self.bridge = bridge  # the bridge the request went through, if any (it may be the one that failed)
        super().__init__(f"server {peer_id}: {message}" + (f" (through bridge {bridge})" if bridge else ""))


def _ranges(blocks: list[int]) -> str:
    parts, start = [], None
    for i, block in enumerate(blocks):
        if start is None:
            start = block
        if i + 1 == len(blocks) or blocks[i + 1] != block + 1:
            parts.append(str(start) if start == block else f"{start}-{block}")
            start = None
    return ", ".join(parts)


class InputMismatch(ServerFailure):
    """A server computed a pushed step on another input than the previous server returned to the client:
    one of the two lies. The session stops using push and rebuilds that server's cache."""

    def __init__(self, peer_id: str, previous_peer_id: str):
        self.previous_peer_id = previous_peer_id
        super().__init__(peer_id, f"computed on another input than server {previous_peer_id} returned")


class SessionMoved(ServerFailure):
    """A server handed this span's session, KV cache and all, to another server (`moved`, a
    `protocol.messages.Moved`) as it left: the session goes on there without replaying anything.
    Where a session cannot take it up, it is a failure of the server that left, as any other."""

    def __init__(self, peer_id: str, moved):
        self.moved = moved
        super().__init__(peer_id, f"handed its session over to {moved.moved_to} at position {moved.position}")


class SessionExpired(ServerFailure):
    """A server closed this span's session idle (its `--session-timeout`): the client opens it again
    and replays its history, on the same server if it is still the best, which is not at fault."""


class BadPush(ServerFailure):
    """A server refused the step the previous server of the chain pushed to it (not sealed by the client
    for that step, or of the wrong shape or dtype): the pusher is blamed, never the client, and the
    receiving session is left as it was."""
