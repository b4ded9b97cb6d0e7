"""The messages of running blocks remotely: RPC names and typed request/reply headers.

Client and server both speak them. Every message is hivemind's `ExpertRequest` / `ExpertResponse`
protobuf: tensors travel as serialized torch tensors (`protocol.tensors`), and a msgpack header
carries one of the typed models below. Readers validate headers before acting on anything.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Sequence

import msgpack
import torch
from hivemind.proto import runtime_pb2
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.errors import ErrorKind, MalformedMessage, WireError
from protocol.tensors import serialize_tensor
from telemetry.tracing import TRACEPARENT_PATTERN

ADAPTER_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,63})?$"
RPC_INFERENCE = "swarm.BlockService.rpc_inference"
RPC_FORWARD = "swarm.BlockService.rpc_forward"
RPC_INFO = "swarm.BlockService.rpc_info"
RPC_ECHO = "swarm.BlockService.rpc_echo"  # returns its payload: peers measure their bandwidth with it
RPC_PUSH = "swarm.BlockService.rpc_push"  # the previous server of a chain hands a step's output straight on
RPC_PUSH_STREAM = "swarm.BlockService.rpc_push_stream"  # the same, one stream (channel) per session and next server
RPC_IMPORT = "swarm.BlockService.rpc_import"  # a server hands an open session's KV cache to another
# Sessions, stateless forwards and push streams to one peer, as channels of one stream (`protocol.bundles`).
RPC_BUNDLE = "swarm.BlockService.rpc_bundle"
ECHO_MAX_BYTES = 1536 * 1024
# Every RPC of a server: all a bridge carries to a server behind NAT.
SWARM_RPCS = frozenset(
    {RPC_INFERENCE, RPC_FORWARD, RPC_INFO, RPC_ECHO, RPC_PUSH, RPC_PUSH_STREAM, RPC_IMPORT, RPC_BUNDLE}
)
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{40,60}$"

# A prefix cache reuses a prompt in blocks of this many tokens (vLLM's default block size).
PREFIX_BLOCK_TOKENS = 16

# A header larger than this is refused unread.
MAX_HEADER_BYTES = 64 * 1024


class _Header(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ClientAdapter(_Header):
    """A client's own LoRA adapter for one session: its scaling, and what its tensors are, in order
    (lora_A then lora_B of each projection of each block listed)."""

    alpha: float = Field(gt=0, le=1e6)
    rslora: bool = False
    entries: tuple[tuple[int, str], ...] = Field(min_length=1, max_length=7 * 4096)


class OpenSession(_Header):
    """First message of an inference stream: reserves cache for `batch_size × max_length` tokens.

    With a batch of one, the message may carry the prompt's token ids (int64 [tokens]): the server
    keeps the prompt's KV when the session ends, for a later session of the same client that starts
    the same. `reuse_tokens` asks it to start this one from as much of its cached prefix as it holds,
    up to that many tokens (`SessionOpened.cached_tokens` says how many: the session's position)."""

    model: str = Field(max_length=160)
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    max_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    session_id: str = Field(default="", max_length=64)
    # The key that opens this session's layers of sealed routes (`protocol.routes`); empty: routes of
    # pushes into this session travel in the clear, as before sealed routes.
    route_key: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    reuse_tokens: int = Field(default=0, ge=0)
    # A LoRA adapter for this session: one the server serves, by name, or with `client_adapter` the
    # client's own, whose tensors follow the prompt ids in the message (`ClientAdapter.entries`).
    adapter: str = Field(default="", pattern=ADAPTER_PATTERN)
    client_adapter: Optional[ClientAdapter] = None
    # Attach to the session `session_id` another server handed over here (`ImportSession`), at the
    # position it reached there, instead of opening a new one: only its client may.
    resume: bool = False
    # With `resume`: the session was spilled to the server's KV tier (`Moved.tier`), by the server
    # whose receipt key is `exporter_key` (this server, or one that shared the tier and is gone).
    from_tier: bool = False
    exporter_key: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")


class SessionOpened(_Header):
    session_id: str
    max_length: int
    cached_tokens: int = Field(default=0, ge=0)  # positions [0, cached_tokens) came from the prefix cache


class Hop(_Header):
    """A later server of the chain: where a step's output goes next, in which of its sessions, in which dtype."""

    peer_id: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=16, max_length=64)
    addrs: tuple[str, ...] = Field(default=(), max_length=16)
    # Set when it is reachable only through bridges (peers from before the rename send relay_addrs).
    bridge_addrs: tuple[str, ...] = Field(
        default=(), max_length=4, validation_alias=AliasChoices("bridge_addrs", "relay_addrs")
    )
    dtype: Literal["float32", "bfloat16", "float16"]

    @field_validator("addrs", "bridge_addrs")
    @classmethod
    def _short_addrs(cls, addrs: tuple[str, ...]) -> tuple[str, ...]:
        if any(len(addr) > 256 for addr in addrs):
            raise ValueError("multiaddr too long")
        return addrs


class Step(_Header):
    """One step of a session: hidden states [batch, tokens, hidden] (+ optional 2D attention mask).

    `position` is how many tokens the client believes the server already holds; a mismatch is an
    error instead of silently wrong output. With `rewind`, `position` may be lower: the server forgets
    the tokens from `position` on first (a client rolls back what a wrong server made it compute).
    With a `route`, the server pushes its output to the first hop as well as replying to the client;
    `sealed_route` goes with it, for that hop's server to open (`protocol.routes`: where it pushes
    next). `step_id` numbers a session's routed steps in order (0: not numbered), so that a server can
    drop a pushed step that arrives again late. `traceparent` (W3C trace context; empty unless the
    sender traces) makes the receiver's span of this step a child of the sender's.
    """

    position: int = Field(ge=0)
    step_id: int = Field(default=0, ge=0)
    route: tuple[Hop, ...] = Field(default=(), max_length=64)
    sealed_route: str = Field(default="", max_length=48 * 1024)
    rewind: bool = False
    traceparent: str = Field(default="", pattern=TRACEPARENT_PATTERN.replace("^", "^(").replace("$", ")?$"))


class Push(Step):
    """A step pushed by the previous server of a chain into session `session_id`, which the client
    opened here; the server treats it as if the client had sent it. Its `sealed_route` is for this
    server to open: the client's word for the step's position and rewind, and where it goes next."""

    session_id: str = Field(min_length=16, max_length=64)


class PushAccepted(_Header):
    session_id: str


class PushFailed(_Header):
    """From a server, unasked, on its client's stream: it cannot push this session's steps on to the
    next server `failed_push_to` (the link between the two failed, which is nobody's fault yet). The
    client sends that hop's steps itself from now on."""

    failed_push_to: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="", max_length=1024)


MAX_PREFIX_KEYS = 512  # prompt blocks an import names (8 192 tokens): the header stays far below its cap

PrefixKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # a prefix-cache block key, hex


class ImportProbe(_Header):
    """An optional first message of `rpc_import`: the exporter names the prefix-cache keys of the
    session's prompt blocks (`swarm.prefix_cache.block_keys`, hex), and the importer answers
    `ImportHeld` with how many of their tokens its own prefix cache holds (kept for this import):
    the `ImportSession` that follows then carries only the rest."""

    start_block: int = Field(ge=0)  # the session's first block (only a server announcing it may ask)
    probe_keys: tuple[PrefixKey, ...] = Field(min_length=1, max_length=MAX_PREFIX_KEYS)


class ImportHeld(_Header):
    tokens: int = Field(ge=0)  # the prompt's first `tokens` positions are cached here already


class ImportSession(_Header):
    """First message of `rpc_import` (after an `ImportProbe`, if any): server `exporter` hands its
    client `owner`'s open session `session_id` (blocks, batch, length, position, what it computes in:
    `precision`) to this server. Its KV cache from position `skip` on follows in `chunks` messages of
    [layers · 2 · batch, kv_heads, tokens, head_dim] (and a last one with the boolean attention mask
    [batch, position], if the session has one); positions [0, skip) are the importer's own cached
    prefix of the prompt whose block keys are `prefix_keys`. `digest` covers the keys, `skip` and the
    tensors in order, and `signature` is the exporter's receipt key's over `export_message()`."""

    model: str = Field(max_length=160)
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    max_length: int = Field(gt=0)
    position: int = Field(ge=0)
    session_id: str = Field(min_length=8, max_length=64)
    route_key: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    owner: str = Field(pattern=PEER_ID_PATTERN)
    exporter: str = Field(pattern=PEER_ID_PATTERN)
    precision: str = Field(max_length=160)
    adapter: str = Field(default="", pattern=ADAPTER_PATTERN)
    last_step_id: int = Field(default=0, ge=0)
    chunks: int = Field(ge=0, le=1 << 16)
    masked: bool = False
    skip: int = Field(default=0, ge=0)
    prefix_keys: tuple[PrefixKey, ...] = Field(default=(), max_length=MAX_PREFIX_KEYS)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class MoveSession(_Header):
    """From the client, on its session's stream, between steps: hand this session over to server
    `move_to` (a decode server, once a prefill server has computed the prompt). The answer is the
    `Moved` notice, or an error reply if it stays here."""

    move_to: str = Field(pattern=PEER_ID_PATTERN)


class SessionImported(_Header):
    session_id: str


class Moved(_Header):
    """From a server, on its client's stream, as the last reply: the session now lives on server
    `moved_to` (at `addrs`), which imported its KV cache at `position`; the client attaches there
    (`OpenSession.resume`) and goes on without replaying anything. Signed like the import."""

    moved_to: str = Field(pattern=PEER_ID_PATTERN)
    addrs: tuple[str, ...] = Field(default=(), max_length=16)
    position: int = Field(ge=0)
    # The session went to the server's KV tier (Redis) instead, idle too long: `moved_to` (or another
    # server announcing the same `kv_tier`) takes it back from there (`OpenSession.from_tier`).
    tier: bool = False
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class Expect(_Header):
    """From the client: step `step_id` will arrive pushed by the previous server. The server ignores
    it; writing it makes a dead server's stream fail now rather than after `request_timeout`."""

    expect_step: int = Field(ge=0)


class StepDone(_Header):
    position: int  # tokens held after this step
    step_id: int
    # SHA-256 of the input the server computed on: with push, the client learns whether the previous
    # server pushed what it returned to the client (what the client would check the step against).
    input_digest: str = Field(default="", max_length=64)
    output_digest: str = Field(default="", max_length=64)
    receipt: str = Field(default="", max_length=128)  # the server's signature of the step (protocol.receipts)


class ForwardRequest(_Header):
    """First message of a stateless forward: the input then arrives in token chunks on the stream,
    and the server keeps a temporary cache for `batch_size × total_tokens` until the last chunk."""

    model: str = Field(max_length=160)
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    total_tokens: int = Field(gt=0)
    adapter: str = Field(default="", pattern=ADAPTER_PATTERN)  # one the server serves, by name


class ServerInfoReply(_Header):
    """What a server serves and how loaded it is (the info call)."""

    model: str
    start_block: int
    end_block: int
    state: str
    dtype: str
    hidden_size: int
    max_length: int
    max_batch_size: int
    max_chunk_tokens: int
    cache_tokens_free: int
    cache_tokens_total: int
    open_sessions: int
    version: str


class ErrorReply(_Header):
    error: ErrorKind
    message: str = Field(max_length=4096)


def pack(header: Optional[_Header], tensors: Sequence[torch.Tensor] = (), *, request: bool) -> Any:
    metadata = msgpack.packb(header.model_dump(mode="json"), use_bin_type=True) if header is not None else b""
    serialized = [serialize_tensor(t.detach().cpu()) for t in tensors]
    if request:
        return runtime_pb2.ExpertRequest(uid="", tensors=serialized, metadata=metadata)
    return runtime_pb2.ExpertResponse(tensors=serialized, metadata=metadata)


def error_response(error: WireError) -> runtime_pb2.ExpertResponse:
    return pack(ErrorReply(error=error.kind, message=error.message[:4096]), request=False)


def read_header(
    message: Any, model: type[BaseModel], max_bytes: int = MAX_HEADER_BYTES, error_replies: bool = True
) -> BaseModel:
    """Parses a message's header (at most `max_bytes`) as `model`; an `ErrorReply` header is raised as
    a `WireError`, unless `error_replies` is False (a request, which no error reply can be)."""
    if len(message.metadata) > max_bytes:
        raise MalformedMessage(f"header of {len(message.metadata)} bytes exceeds {max_bytes}")
    try:
        raw = msgpack.unpackb(message.metadata, raw=False) if message.metadata else {}
    except (ValueError, msgpack.UnpackException) as e:
        raise MalformedMessage(f"header is not valid msgpack: {e}") from None
    if error_replies and isinstance(raw, dict) and "error" in raw and model is not ErrorReply:
        try:
            reply = ErrorReply.model_validate(raw)
        except ValidationError:
            raise WireError(ErrorKind.SERVER_ERROR, f"malformed error reply: {raw!r:.200}") from None
        raise WireError(reply.error, reply.message)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise MalformedMessage(f"invalid {model.__name__}: {_first_error(e)}") from None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "header"
    return f"{location}: {first['msg']}"
