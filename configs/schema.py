"""Option schemas of Swarm's programs: types, defaults and help text in one place."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_BLOCKS_RE = re.compile(r"^(\d+):(\d+)$")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_VERIFY_RATE = 0.05  # the clients' spot-check rate (client/verify.py)
VERIFY_HELP = (
    "fraction of steps after which every span's new outputs are recomputed by other servers and compared "
    "(a span's first step is always checked; 0: no checks)"
)


@dataclass(frozen=True)
class WorkingHours:
    """A daily window in local time, e.g. 09:00-18:00; a window like 22:00-06:00 wraps midnight."""

    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> "WorkingHours":
        try:
            start, end = (dt.time.fromisoformat(part.strip()) for part in text.split("-"))
        except ValueError:
            raise ValueError(f"working hours must look like 09:00-18:00, got {text!r}") from None
        if start == end:
            raise ValueError("working hours start and end at the same time")
        return cls(start, end)

    def contains(self, moment: dt.time) -> bool:
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def _valid_hours(value: Optional[str]) -> Optional[str]:
    if value is not None:
        WorkingHours.parse(value)
    return value


HoursText = Annotated[Optional[str], AfterValidator(_valid_hours)]
"""Working hours as text (`09:00-18:00`), checked on the way in."""

_TRANSPORT_MADDR_RE = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/[^/]+/tcp/([0-9]{1,5})$")


def _valid_announce_maddrs(values: list[str]) -> list[str]:
    """`--announce-maddrs A B` and `--announce-maddrs A,B` mean the same; each must name a host and a
    real TCP port (peers dial exactly what is announced)."""
    addrs = [addr.strip() for value in values for addr in value.split(",") if addr.strip()]
    for addr in addrs:
        match = _TRANSPORT_MADDR_RE.match(addr)
        if match is None or not 0 < int(match.group(2)) <= 65535:
            raise ValueError(f"{addr!r} is not an address like /ip4/203.0.113.5/tcp/31337 (a host and a TCP port)")
    return addrs


AnnounceMaddrs = Annotated[list[str], AfterValidator(_valid_announce_maddrs)]

_PEER_MADDR_RE = re.compile(
    r"^/(ip4|ip6|dns|dns4|dns6)/[^/]+/(tcp|udp)/([0-9]{1,5})(/[a-z0-9-]+)*/p2p/[1-9A-HJ-NP-Za-km-z]{20,128}$"
)


def valid_initial_peers(values: list[str]) -> list[str]:
    """`--initial-peers A B` and `A,B` mean the same; each must be a peer's full multiaddr (host,
    port and peer id, as a bootstrap node prints it), checked here rather than by the DHT daemon
    seconds later."""
    addrs = [addr.strip() for value in values for addr in value.split(",") if addr.strip()]
    for addr in addrs:
        match = _PEER_MADDR_RE.match(addr)
        if match is None or not 0 < int(match.group(3)) <= 65535:
            raise ValueError(
                f"{addr!r} is not a peer's multiaddr like /ip4/127.0.0.1/tcp/31337/p2p/QmXyz… "
                "(a host, a port and the peer id, as the bootstrap node prints it)"
            )
    return addrs


InitialPeers = Annotated[list[str], AfterValidator(valid_initial_peers)]

# The regions of the volunteer platform's README: servers announce one, clients prefer their own.
REGIONS = ("asia-east", "asia-south", "europe-west", "europe-east", "america-north", "america-south", "oceania")


def valid_region(value: str) -> str:
    """A region is one of REGIONS, or empty (none)."""
    if value and value not in REGIONS:
        raise ValueError(f"unknown region {value!r}: use one of {', '.join(REGIONS)} (or leave it empty)")
    return value


Region = Annotated[str, AfterValidator(valid_region)]

_OTLP_RE = re.compile(r"^https?://[^/\s]+(/[^\s]*)?$")


def valid_otlp_endpoint(value: Optional[str]) -> Optional[str]:
    """An OTLP/HTTP receiver's URL (its base, or its /v1/traces path), or None: tracing off."""
    if value is not None and not _OTLP_RE.match(value):
        raise ValueError("must be an OTLP/HTTP receiver's URL, e.g. http://127.0.0.1:4318")
    return value


OtlpEndpoint = Annotated[Optional[str], AfterValidator(valid_otlp_endpoint)]
OTLP_HELP = (
    "send OpenTelemetry traces (one per generation) to this OTLP/HTTP receiver, e.g. http://127.0.0.1:4318 "
    "(/v1/traces is added to a base URL); off when unset"
)
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def adapter_name(entry: str) -> str:
    """The name an --adapters entry serves its adapter under: NAME=PATH, else the folder's name."""
    name = entry.split("=", 1)[0] if "=" in entry else entry.rstrip("/").rsplit("/", 1)[-1]
    if not ADAPTER_NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return name


MDNS_HELP = (
    "LAN discovery with libp2p mDNS (multicast; off unless given): without --initial-peers, join the swarm "
    "of the peers found on this LAN (or start one), announce this node there, and join peers found later"
)
ANNOUNCE_MADDRS_HELP = (
    "multiaddrs other peers dial instead of the listen address, for a port forward or a proxy "
    "in front of this node, e.g. /ip4/203.0.113.5/tcp/31337 (default: the listen address)"
)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkOptions(_Schema):
    # Options renamed since they were documented: the earlier flag, environment variable and YAML key
    # still work (the NAT side was called "relay", which is the coordinator's name).
    RENAMED: ClassVar[dict[str, str]] = {
        "no_relay": "no_bridge",
        "relay_max_servers": "bridge_max_servers",
        "relay_hop_limit": "bridge_max_circuits",
        "relay_max_mbytes": "bridge_max_mbytes",
        "relay_max_seconds": "bridge_max_seconds",
    }

    initial_peers: InitialPeers = Field(
        default_factory=list, description="multiaddrs of DHT peers to join, e.g. /ip4/127.0.0.1/tcp/31337/p2p/Qm..."
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 to accept other machines)")
    port: int = Field(0, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)")
    identity: Optional[str] = Field(None, description="private key file giving a stable peer id (created if absent)")
    announce_maddrs: AnnounceMaddrs = Field(default_factory=list, description=ANNOUNCE_MADDRS_HELP)
    nat_port_map: bool = Field(
        False, description="ask the LAN gateway to forward a port (UPnP/NAT-PMP); off unless you opt in"
    )
    public_ip: Optional[str] = Field(
        None,
        description="this machine's public IP address: announce it (with --port) and skip the reachability "
        "check, for a port forward the operator set up",
    )
    no_bridge: bool = Field(
        False,
        description="neither bridge circuits to servers behind NAT nor attach to a bridge when unreachable",
    )
    bridge_max_servers: int = Field(16, ge=0, description="as a bridge: unreachable servers attached at most")
    bridge_max_circuits: int = Field(64, ge=0, description="as a bridge: circuits open at once at most")
    bridge_max_mbytes: float = Field(
        1024.0, gt=0, description="as a bridge: megabytes one circuit may carry, both ways"
    )
    bridge_max_seconds: float = Field(3600.0, gt=0, description="as a bridge: seconds one circuit may stay open")
    bridge_max_circuits_per_source: int = Field(
        8, ge=0, description="as a bridge: circuits one caller may have open through it at once"
    )
    mdns: bool = Field(False, description=MDNS_HELP)
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")

    @field_validator("public_ip")
    @classmethod
    def _check_ip(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            ipaddress.ip_address(value)  # ValueError: not an IP address
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()


class ServerOptions(NetworkOptions):
    # The volunteer platform's worker environment variables, read where the SWARM_* name is unset.
    ENV_ALIASES: ClassVar[dict[str, str]] = {
        "relay": "GPU_SERVER_URL",
        "region": "GPU_REGION",
        "acceptance_rate": "GPU_ACCEPTANCE_RATE",
        "max_concurrent_sessions": "GPU_MAX_CONCURRENT_JOBS",
        "relay_heartbeat_period": "GPU_HEARTBEAT_INTERVAL",
    }

    model: str = Field(description="path to a checkpoint directory (config.json + *.safetensors)")
    blocks: Optional[str] = Field(
        None,
        description="block range START:END to host, END exclusive, e.g. 0:16 "
        "(default: chosen from what the swarm lacks)",
    )
    num_blocks: Optional[int] = Field(
        None, gt=0, description="how many blocks to host when --blocks is not given (default: as many as fit in memory)"
    )
    rebalance_period: float = Field(
        120.0,
        ge=0,
        description="without --blocks: seconds between checks whether other blocks need this server more (0: never)",
    )
    rebalance_threshold: float = Field(
        0.2, ge=0, description="move only if the swarm's weakest block gains more than this fraction"
    )
    model_name: Optional[str] = Field(
        None, description="name the model is announced under (default: derived from the checkpoint)"
    )
    device: str = Field("cpu", description="torch device for the blocks: cpu, cuda, cuda:1, mps")
    dtype: str = Field("float32", description="float32, bfloat16 or float16")
    quant: str = Field(
        "none",
        description="store the blocks' linear weights quantized: int8 (weight-only, per channel; torchao) or nf4 "
        "(4-bit NormalFloat; bitsandbytes), for less memory; announced, so clients that want exact "
        "output (quant='none') route around this server",
    )
    role: str = Field(
        "mixed",
        description="prefill: long prompts are computed here and their KV then moves to a decode server of "
        "the same blocks; decode: sessions go on here after a prefill server computed their prompt; mixed: "
        "both (where the swarm has no prefill and decode servers for some blocks, everyone computes everything)",
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters to serve, each a folder as peft saves it (adapter_config.json and "
        "adapter_model.safetensors; pickles are never loaded), named after the folder or NAME=PATH; "
        "announced, so a session that asks for one is routed here",
    )
    max_client_adapter_mbytes: float = Field(
        16.0,
        ge=0,
        description="largest LoRA adapter a client may send for its own session (its share for this "
        "server's blocks, charged to --cache-tokens and freed with the session; 0: none)",
    )
    cache_tokens: int = Field(16384, gt=0, description="KV-cache budget in tokens across all open sessions")
    prefix_cache: bool = Field(
        True,
        description="keep finished sessions' prompt KV in the cache budget for a later session of the same "
        "client that starts the same (it yields to live sessions; --no-prefix-cache keeps none)",
    )
    kv_redis: Optional[str] = Field(
        None,
        description="a Redis server for the prefix cache's pages once they leave the pool (evicted, or at exit), "
        "e.g. redis://127.0.0.1:6379/0: a later prompt that starts the same takes them back, on this server "
        "or after its restart with the same --identity; entries are signed, checked and expire",
    )
    kv_redis_ttl: float = Field(86400.0, gt=0, description="seconds a page stays in --kv-redis")
    kv_host_mbytes: float = Field(
        0.0,
        ge=0,
        description="host memory for prefix pages and idle sessions that leave the pool, before --kv-redis "
        "(for a pool on an accelerator: --device cuda or mps; 0: none)",
    )
    prefix_cache_tokens: Optional[int] = Field(
        None, gt=0, description="most tokens the prefix cache may keep (default: all of --cache-tokens)"
    )
    max_length: Optional[int] = Field(
        None,
        gt=0,
        description="longest session (tokens) a client may open "
        "(default: the model's context, capped by --cache-tokens)",
    )
    max_batch_size: int = Field(16, gt=0, description="largest batch a session may use")
    max_chunk_tokens: int = Field(2048, gt=0, description="most tokens per sequence in one step message")
    max_batch_tokens: int = Field(
        2048,
        gt=0,
        description="most tokens (rows × tokens) in one batched forward of all sessions' pending steps; "
        "a longer prompt runs in chunks of this size between the other sessions' steps",
    )
    session_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds a session may stay idle before the server closes it (its client then opens it "
        "again and replays it; with --kv-redis: keeps it in Redis, where its client takes it up again)",
    )
    drain_timeout: float = Field(
        60.0,
        ge=0,
        description="on SIGTERM, seconds the open sessions no other server could take over may take to finish "
        "before the server exits (it tries again to hand them over meanwhile)",
    )
    acceptance_rate: float = Field(1.0, gt=0, le=1, description="fraction of new sessions to accept (load control)")
    max_concurrent_sessions: Optional[int] = Field(
        None, gt=0, description="most sessions open at once (default: no limit)"
    )
    max_sessions_per_hour: Optional[int] = Field(
        None, gt=0, description="most new sessions per hour (default: no limit)"
    )
    max_streams_per_peer: int = Field(
        64, gt=0, description="most sessions and stateless forwards one peer may have open here at once"
    )
    max_sessions_per_peer: int = Field(32, gt=0, description="most sessions one peer may have open here at once")
    max_cache_share_per_peer: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of --cache-tokens one peer's sessions may reserve (one session of --max-length always fits)",
    )
    max_buffered_mbytes_per_peer: float = Field(
        256.0, gt=0, description="megabytes of one peer's messages that may wait here, read ahead or pushed, at once"
    )
    working_hours: HoursText = Field(
        None,
        description="daily window in local time when the server takes sessions, e.g. 09:00-18:00 (default: always)",
    )
    max_memory_fraction: float = Field(
        0.8,
        gt=0,
        le=1,
        description="share of free device memory that blocks and KV cache may take when sizing --num-blocks",
    )
    throughput: Optional[float] = Field(
        None, gt=0, description="announce this throughput (tokens/s) instead of measuring it"
    )
    region: Region = Field("", description=f"region announced to clients, one of {', '.join(REGIONS)} (empty: none)")
    public_name: str = Field("", max_length=64, description="name shown on the swarm's health page")
    announce_period: float = Field(30.0, gt=0, description="seconds between refreshes of this server's DHT records")
    record_ttl: float = Field(90.0, gt=0, description="seconds a DHT record lives unless refreshed")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="HTTP port of this server's Prometheus /metrics on --host (0 picks a free one)"
    )
    relay: Optional[str] = Field(
        None, description="URL of a relay's API port to register with, e.g. http://127.0.0.1:8000 (optional)"
    )
    relay_join_token: Optional[str] = Field(None, description="join token the relay requires to register, if any")
    relay_heartbeat_period: float = Field(30.0, gt=0, description="seconds between heartbeats to the relay")
    otlp_endpoint: OtlpEndpoint = Field(None, description=OTLP_HELP)
    status_file: Optional[str] = Field(
        None,
        description="while running, write the pid and the local status URL here (`swarm.worker status` reads it)",
    )

    @field_validator("relay")
    @classmethod
    def _check_relay(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError("must be the relay's base URL, e.g. http://127.0.0.1:8000")
        return value.rstrip("/") if value else value

    @field_validator("blocks")
    @classmethod
    def _check_blocks(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        match = _BLOCKS_RE.match(value.strip())
        if not match or int(match.group(1)) >= int(match.group(2)):
            raise ValueError("must be START:END with START < END, e.g. 0:16")
        return value.strip()

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in ("float32", "bfloat16", "float16"):
            raise ValueError("must be float32, bfloat16 or float16")
        return value

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, value: list[str]) -> list[str]:
        entries = [item.strip() for raw in value for item in raw.split(",") if item.strip()]
        names = [adapter_name(entry) for entry in entries]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two adapters are named {', '.join(repeated)}: name them with NAME=PATH")
        return entries

    @field_validator("kv_redis")
    @classmethod
    def _check_redis(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.match(r"^rediss?://[^/\s]+(/\d+)?$", value):
            raise ValueError("must be a Redis URL, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("role")
    @classmethod
    def _check_role(cls, value: str) -> str:
        if value not in ("prefill", "decode", "mixed"):
            raise ValueError("must be prefill, decode or mixed")
        return value

    @field_validator("quant")
    @classmethod
    def _check_quant(cls, value: str) -> str:
        if value not in ("none", "int8", "nf4"):
            raise ValueError("must be none, int8 or nf4")
        return value

    @model_validator(mode="after")
    def _check_periods(self) -> "ServerOptions":
        if self.announce_period >= self.record_ttl:
            raise ValueError("announce_period must be shorter than record_ttl, or records lapse between refreshes")
        return self

    @property
    def block_range(self) -> Optional[tuple[int, int]]:
        if self.blocks is None:
            return None
        start, end = self.blocks.split(":")
        return int(start), int(end)


class BootstrapOptions(NetworkOptions):
    port: int = Field(31337, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)")


class GenerateOptions(_Schema):
    model: str = Field(
        description="path to the same checkpoint the servers run (the client loads embeddings and LM head)"
    )
    initial_peers: InitialPeers = Field(
        default_factory=list, description="multiaddrs of swarm peers, e.g. the bootstrap node's (or --mdns)"
    )
    mdns: bool = Field(
        False,
        description="find the swarm's peers on this LAN with libp2p mDNS instead of --initial-peers "
        "(multicast; off unless given)",
    )
    prompt: str = Field(description="text to continue or (with a chat template) to answer")
    max_new_tokens: int = Field(64, gt=0, description="tokens to generate")
    model_name: Optional[str] = Field(
        None, description="name the model is announced under (default: derived from the checkpoint)"
    )
    chat: Optional[bool] = Field(
        None, description="wrap the prompt in the tokenizer's chat template (default: when it has one)"
    )
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_k: int = Field(50, ge=0, description="sample among the k most likely tokens (0: no limit)")
    top_p: float = Field(1.0, gt=0, le=1, description="sample among the most likely tokens whose probability sums to p")
    repetition_penalty: float = Field(1.0, gt=0, description="penalty for repeating tokens (1.0: none)")
    prompt_lookup: int = Field(
        0,
        ge=0,
        description="speculative decoding: draft up to this many tokens from n-grams of the context, "
        "verified in one trip through the swarm (transformers' prompt_lookup_num_tokens; 0: off)",
    )
    region: Region = Field(
        "",
        description=f"this client's region, one of {', '.join(REGIONS)}: among comparable chains, servers "
        "announcing the same --region are preferred (empty: no preference)",
    )
    request_timeout: float = Field(60.0, gt=0, description="seconds to wait for any server reply")
    step_timeout: float = Field(
        300.0, gt=0, description="seconds one step through the swarm may take in all, retries and failovers included"
    )
    verify: float = Field(DEFAULT_VERIFY_RATE, ge=0, le=1, description=VERIFY_HELP)
    otlp_endpoint: OtlpEndpoint = Field(None, description=OTLP_HELP)
    log_level: str = Field("warning", description=f"one of {', '.join(LOG_LEVELS)}")

    @model_validator(mode="after")
    def _check_peers(self) -> "GenerateOptions":
        if not self.initial_peers and not self.mdns:
            raise ValueError("give --initial-peers (a swarm peer's multiaddr) or --mdns (find peers on this LAN)")
        return self


EXAMPLE_SERVER_VALUES = {
    "model": "/path/to/checkpoint",
    "initial_peers": ["/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"],
}


class HealthOptions(_Schema):
    initial_peers: InitialPeers = Field(description="multiaddrs of swarm peers, e.g. the bootstrap node's")
    host: str = Field("127.0.0.1", description="address the web page listens on (0.0.0.0 to publish it)")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port of the page")
    refresh_period: float = Field(10.0, gt=0, description="seconds between crawls of the DHT (and page refreshes)")
    nat_port_map: bool = Field(
        False, description="ask the LAN gateway to forward a port (UPnP/NAT-PMP); off unless you opt in"
    )
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")


class RelayOptions(_Schema):
    ENV_PREFIX: ClassVar[str] = "SWARM_RELAY_"

    initial_peers: InitialPeers = Field(
        default_factory=list,
        description="multiaddrs of swarm peers (default: none, the relay starts a new swarm others join)",
    )
    host: str = Field("127.0.0.1", description="address every port listens on (0.0.0.0 to accept other machines)")
    mgmt_port: int = Field(1026, ge=0, le=65535, description="management port: probes, service info, instances")
    obs_port: int = Field(1027, ge=0, le=65535, description="observability port: /metrics and the health page")
    api_port: int = Field(8000, ge=0, le=65535, description="API port: workers, jobs and the OpenAI-compatible API")
    dht_port: int = Field(0, ge=0, le=65535, description="TCP port of the relay's DHT node (0 picks a free one)")
    announce_maddrs: AnnounceMaddrs = Field(
        default_factory=list, description=ANNOUNCE_MADDRS_HELP.replace("this node", "the relay's DHT node")
    )
    db: str = Field("sqlite:///relay.db", description="sqlite:///PATH or postgresql://USER@HOST/DB where state is kept")
    key_file: Optional[str] = Field(
        None,
        description="file with the key sealing workers' signing secrets "
        "(default: relay.key beside a SQLite db, else ./relay.key)",
    )
    admin_token: Optional[str] = Field(
        None, description="token guarding /v1/workers and management writes (default: generated once and printed)"
    )
    api_keys: list[str] = Field(
        default_factory=list, description="keys accepted by the jobs and OpenAI APIs (Bearer or X-API-Key)"
    )
    join_token: Optional[str] = Field(
        None, description="token a server must present to register (default: generated once and printed)"
    )
    open_registration: bool = Field(
        False, description="let any server register without a join token (anyone could then add workers)"
    )
    models: list[str] = Field(
        default_factory=list, description="checkpoint directories served by the OpenAI-compatible API and jobs"
    )
    heartbeat_timeout: float = Field(90.0, gt=0, description="seconds without a heartbeat before a worker is not_ready")
    refresh_period: float = Field(10.0, gt=0, description="seconds between DHT crawls and metrics scrapes")
    min_reliability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="the relay's own requests avoid servers scoring below this (when others cover their blocks)",
    )
    request_timeout: float = Field(30.0, gt=0, description="seconds the relay waits for any server reply")
    verify: float = Field(DEFAULT_VERIFY_RATE, ge=0, le=1, description=f"the relay's own generations: {VERIFY_HELP}")
    verify_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="canary checks: the chance, per server and refresh period, "
        "that the relay sends a server a few random tokens as a "
        "stateless forward and compares the answer with its own "
        "computation (0: none)",
    )
    prompt_lookup: int = Field(
        10,
        ge=0,
        description="speculative decoding in the relay's generations: up to this many tokens drafted from "
        "n-grams of the context and verified in one trip through the swarm (the draft shrinks when it "
        "fails; the output is unchanged); 0 turns it off",
    )
    max_concurrent_generations: int = Field(4, gt=0, description="generations (API requests and jobs) run at once")
    max_queued_jobs: int = Field(
        1000, gt=0, description="jobs waiting at most; more are refused with 429 and Retry-After"
    )
    standby: bool = Field(False, description="start as the standby of a primary/standby pair (readiness answers 503)")
    nat_port_map: bool = Field(
        False, description="ask the LAN gateway to forward a port (UPnP/NAT-PMP); off unless you opt in"
    )
    otlp_endpoint: OtlpEndpoint = Field(
        None, description=OTLP_HELP + "; the OpenAI API continues an incoming traceparent header"
    )
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")

    @field_validator("api_keys")
    @classmethod
    def _split_keys(cls, value: list[str]) -> list[str]:
        """`--api-keys K1,K2` and `--api-keys K1 K2` mean the same."""
        return [key.strip() for item in value for key in item.split(",") if key.strip()]

    @field_validator("db")
    @classmethod
    def _check_db(cls, value: str) -> str:
        if not (value.startswith("sqlite:///") or value.startswith(("postgresql://", "postgres://"))):
            raise ValueError("must be sqlite:///PATH or postgresql://...")
        return value
