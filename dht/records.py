"""What servers announce in the DHT, as typed records validated on read (spec R2).

Readers ignore unknown fields, so newer servers stay readable by older clients, and drop any record
that is malformed or oversized instead of failing.
"""

from __future__ import annotations

import enum
import logging
from typing import Annotated, Any, Literal, Optional

import msgpack
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

logger = logging.getLogger(__name__)

MAX_RECORD_BYTES = 8192
META_KEY_SUFFIX = "_meta"
MAX_BLOCKS = 4096  # more blocks than any model has: a record claiming more is not believed
WireDtype = Literal["float32", "bfloat16", "float16"]  # what a server may compute and send in
QuantMode = Literal["none", "int8", "nf4"]
AdapterName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]


class ServerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, raw: Any):
        """Returns the record, or None (logged at debug) if `raw` is not a valid one."""
        try:
            if len(msgpack.packb(raw, use_bin_type=True)) > MAX_RECORD_BYTES:
                logger.debug("dropping oversized %s", cls.__name__)
                return None
            return cls.model_validate(raw)
        except (ValidationError, TypeError, ValueError, OverflowError) as e:
            logger.debug("dropping malformed %s: %s", cls.__name__, e)
            return None


class Throughput(_Wire):
    """Tokens per second this server processes through all of its blocks."""

    inference: float = Field(ge=0, le=1e9)
    forward: float = Field(ge=0, le=1e9)


class HardwareSummary(_Wire):
    device_type: str = Field(max_length=16)  # cpu | cuda | mps
    device_name: str = Field(max_length=128)
    memory_total: int = Field(ge=0)  # bytes
    memory_free: int = Field(ge=0)


class ServerRecord(_Wire):
    """One server's announcement, stored under every block key it serves."""

    state: ServerState
    start_block: int = Field(ge=0, lt=MAX_BLOCKS)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    throughput: Throughput
    cache_tokens_free: int = Field(ge=0)
    cache_tokens_total: int = Field(ge=0)
    max_length: int = Field(gt=0)
    max_chunk_tokens: int = Field(default=2048, gt=0)
    dtype: WireDtype
    quant: QuantMode = "none"  # how the blocks' linear weights are stored (`blocks.quantization`)
    adapters: tuple[AdapterName, ...] = Field(default=(), max_length=64)  # LoRA adapters it serves
    role: Literal["prefill", "decode", "mixed"] = "mixed"  # what it is for (`swarm.serve --role`)
    kv_tier: str = Field(default="", pattern=r"^([0-9a-f]{16})?$")  # which Redis it spills to (a digest of it)
    client_adapter_bytes: int = Field(default=0, ge=0)  # largest adapter a client may send it (0: none)
    hardware: HardwareSummary
    region: str = Field(default="", max_length=64)
    version: str = Field(max_length=32)
    public_name: str = Field(default="", max_length=64)
    # Reached through bridges (behind NAT): `bridge_addrs` is not empty. (The spec's "relay use".)
    bridged: bool = Field(default=False, validation_alias=AliasChoices("bridged", "using_relay"))
    available: bool = True  # False outside the owner's working hours: takes no new sessions
    addrs: tuple[str, ...] = Field(default=(), max_length=16)
    announced_at: float = Field(default=0.0, ge=0)  # unix time of this announcement
    network_mbps: Optional[float] = Field(default=None, ge=0)  # measured to other servers; None: not yet
    receipt_key: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")  # Ed25519 key of its step receipts (hex)
    reachable: bool = True  # False: other peers cannot dial it (behind NAT); reach it through bridge_addrs
    # The bridges it is attached to (/…/p2p/<bridge>), and whether it is a bridge for others. Records of
    # servers from before the NAT side was called "bridge" name them relay_addrs and relay_node.
    bridge_addrs: tuple[str, ...] = Field(
        default=(), max_length=4, validation_alias=AliasChoices("bridge_addrs", "relay_addrs")
    )
    bridge_node: bool = Field(default=False, validation_alias=AliasChoices("bridge_node", "relay_node"))

    @model_validator(mode="after")
    def _check_range(self) -> "ServerRecord":
        if self.end_block <= self.start_block:
            raise ValueError(f"empty block range {self.start_block}:{self.end_block}")
        if any(len(addr) > 256 for addr in self.addrs + self.bridge_addrs):
            raise ValueError("multiaddr too long")
        if any("/p2p/" not in addr for addr in self.bridge_addrs):
            raise ValueError("a bridge address must end with /p2p/<bridge peer id>")
        return self


class ModelRecord(_Wire):
    """Model metadata under `M._meta`, so a client can check it talks to the model it loaded."""

    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    family: str = Field(max_length=32)
    config_digest: str = Field(min_length=64, max_length=64)
    hidden_size: int = Field(gt=0, le=1 << 20)

    def identity(self) -> tuple:
        """What must agree between servers (and with the client's checkpoint) for them to be one model."""
        return self.num_blocks, self.family, self.config_digest, self.hidden_size


class ModelEntry(_Wire):
    """A server's entry in the swarm-wide list of models (`_swarm.models`), so crawlers can find every model."""

    model: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


MODELS_KEY = "_swarm.models"


def block_key(model: str, block: int) -> str:
    return f"{model}.{block}"


def meta_key(model: str) -> str:
    return f"{model}.{META_KEY_SUFFIX}"


class ServerInfo(BaseModel):
    """A validated record as a reader sees it: who wrote it and until when it holds."""

    model_config = ConfigDict(frozen=True)

    peer_id: str
    record: ServerRecord
    expiration_time: float


def parse_server_entry(peer_id: Optional[str], value: Any, expiration_time: float) -> Optional[ServerInfo]:
    if peer_id is None:
        return None
    record = ServerRecord.from_wire(value)
    if record is None:
        return None
    return ServerInfo(peer_id=peer_id, record=record, expiration_time=expiration_time)
