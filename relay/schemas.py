"""Bodies of the relay's HTTP requests, validated on the way in.

Unknown fields are ignored (clients and servers of newer versions keep working); wrong types,
missing fields and out-of-range values are 400s that name the field.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from configs.schema import HoursText, Region

Role = Literal["prefill", "decode", "mixed"]
WorkerStatus = Literal["joining", "online", "draining", "offline"]  # a server's own states
_ID = Field(ge=0, lt=2**63)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RegisterRequest(_Body):
    name: str = Field(min_length=1, max_length=128)
    hostname: str = Field("", max_length=255)
    port: int = Field(0, ge=0, le=65535, description="the server's swarm (DHT) port")
    peer_id: str = Field(min_length=1, max_length=128)
    peer_public_key: str = Field(
        min_length=1, max_length=4096, description="the peer's identity key, [owner:ssh-rsa …]"
    )
    peer_signature: str = Field(
        min_length=1, max_length=2048, description="base64 RSA signature of swarm-relay-register:<peer_id>:<signed_at>"
    )
    signed_at: StrictInt = Field(ge=0, lt=2**40, description="unix seconds when the signature was made")
    model: str = Field(min_length=1, max_length=256)
    role: Role = "mixed"
    region: str = Field("", max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    system_reserved: dict[str, int] = Field(default_factory=lambda: {"ram": 0, "vram": 0}, max_length=8)
    status: dict[str, Any] = Field(default_factory=dict, description="hardware status, GPUStack field names")
    metrics_port: Optional[int] = Field(None, ge=1, le=65535)
    join_token: Optional[str] = Field(None, max_length=512)


class LoadConfig(_Body):
    """Load control the relay may push to a worker (seed 001)."""

    acceptance_rate: float = Field(1.0, gt=0, le=1)
    max_concurrent_sessions: Optional[int] = Field(None, gt=0, le=1_000_000)
    max_sessions_per_hour: Optional[int] = Field(None, gt=0, le=100_000_000)
    working_hours: HoursText = Field(None, max_length=32)


class HeartbeatRequest(_Body):
    status: WorkerStatus = "online"
    config_version: StrictInt = Field(0, ge=0, lt=2**63)
    load: dict[str, float] = Field(default_factory=dict, max_length=32)
    hardware: Optional[dict[str, Any]] = None
    latency_ms: Optional[float] = Field(None, ge=0, le=3_600_000)
    metrics_port: Optional[int] = Field(None, ge=1, le=65535)


class RefreshRequest(_Body):
    refresh_token: str = Field(min_length=1, max_length=512)


class ReportRequest(_Body):
    """A client's report of one session with one server."""

    peer_id: str = Field(min_length=1, max_length=128)
    success: StrictBool
    latency_ms: Optional[float] = Field(None, ge=0, le=3_600_000)


class ReceiptBody(_Body):
    """A server's signature of one step (`protocol.receipts`)."""

    position: StrictInt = Field(ge=0, le=1 << 20)
    tokens: StrictInt = Field(gt=0, le=1 << 20)
    input_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    output_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")


class EvidenceReport(_Body):
    """A client's evidence that a server returned wrong results (`verification.evidence.evidence_body`): the
    server's receipts for every step of the session up to the disputed positions, and the tensors
    (base64 safetensors: `inputs` float32 [batch, positions, hidden], the server's `outputs` at positions
    [verified, positions) in its dtype, optional int64 `mask` [batch, positions])."""

    model: str = Field(min_length=1, max_length=160)
    peer_id: str = Field(min_length=1, max_length=128)
    start_block: StrictInt = Field(ge=0)
    end_block: StrictInt = Field(gt=0)
    dtype: Literal["float32", "bfloat16", "float16"]
    quant: Literal["none", "int8", "nf4"] = "none"  # the server's weights, as its receipts sign them
    adapter: str = Field(default="", max_length=64)  # the LoRA adapter the session ran with, as signed
    session_id: str = Field(min_length=16, max_length=64)
    verified: StrictInt = Field(ge=0)
    receipts: list[ReceiptBody] = Field(min_length=1, max_length=8192)
    tensors: str = Field(min_length=1)


class Endpoint(_Body):
    id: StrictInt = _ID
    ip: str = Field(max_length=255)
    business_port: Union[str, int]
    mgmt_port: Union[str, int]


class Instance(_Body):
    job_name: str = Field("", max_length=256)
    model_name: str = Field(max_length=256)
    id: StrictInt = _ID
    role: Role
    endpoints: dict[str, dict[str, Endpoint]] = Field(default_factory=dict)


class RefreshInstancesRequest(_Body):
    event: Literal["add", "del", "set"]
    instances: list[Instance] = Field(max_length=100_000)


class InstanceIds(_Body):
    ids: list[StrictInt] = Field(min_length=1, max_length=100_000)

    @field_validator("ids")
    @classmethod
    def _check_ids(cls, value: list[int]) -> list[int]:
        if any(not 0 <= i < 2**63 for i in value):
            raise ValueError("ids are unsigned 64-bit integers")
        return value


class QueryTasksRequest(_Body):
    p_id: StrictInt = _ID
    d_id: StrictInt = _ID


class BackupInfo(_Body):
    is_master: StrictBool
    is_abnormal: StrictBool


class QueryWorkerInfoRequest(_Body):
    instance_id: str = Field(min_length=1, max_length=256)
    worker_ids: list[StrictInt] = Field(max_length=10_000)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class SamplingParams(_Body):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=1)
    stop: Union[str, list[str], None] = None
    stream: StrictBool = False
    seed: Optional[int] = Field(None, ge=0, lt=2**63)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if isinstance(value, list) and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("at most 4 non-empty stop strings")
        if value == "":
            raise ValueError("stop must not be empty")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)


class CompletionRequest(SamplingParams):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request")
            return value[0]
        return value


class JobRequest(_Body):
    type: Literal["llm"]
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_tokens: Optional[int] = Field(None, ge=1, le=1_000_000)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    # the job runs on a chain that prefers servers of this region (one of the platform's; empty: any)
    region: Region = ""
