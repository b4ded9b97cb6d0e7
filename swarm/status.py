"""A running server's own account of itself: what `GET /status` on its local HTTP port answers, and the
status file that tells `python -m swarm.worker status` where that port is.

Light on purpose (pydantic and the standard library only): the worker CLI reads these without torch.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

RECENT_PROBLEMS = 20  # warnings and errors kept for `status`


class StatusModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sessions(StatusModel):
    open: int = Field(ge=0)
    max_concurrent: Optional[int] = None
    max_length: int = Field(gt=0, description="longest session (tokens) this server accepts")


class Cache(StatusModel):
    tokens_total: int = Field(ge=0)
    tokens_free: int = Field(ge=0)
    prefix_tokens: int = Field(ge=0, description="tokens held by cached prompt prefixes (they yield to sessions)")


class Load(StatusModel):
    throughput_tokens_per_s: Optional[float] = None
    acceptance_rate: float
    requests_waiting: int = Field(ge=0)
    median_step_ms: Optional[float] = None
    prompt_tokens: int = Field(ge=0)
    generation_tokens: int = Field(ge=0)


class RelayState(StatusModel):
    url: str
    worker_id: Optional[int] = None
    last_heartbeat_seconds_ago: Optional[float] = None
    last_error: Optional[str] = None


class Reachability(StatusModel):
    reachable: bool
    bridge: bool = Field(description="whether it relays circuits for unreachable servers")
    attached_bridges: list[str] = Field(default_factory=list, description="when unreachable: the bridges it uses")


class Problem(StatusModel):
    time: float
    level: str
    logger: str
    message: str


class ServerStatus(StatusModel):
    state: str
    version: str
    model: str
    start_block: int
    end_block: int
    peer_id: str
    addresses: list[str]
    region: str
    uptime_seconds: float
    sessions: Sessions
    cache: Cache
    load: Load
    relay: Optional[RelayState] = None
    reachability: Reachability
    recent_problems: list[Problem]


class RecentProblems(logging.Handler):
    """Keeps the last warnings and errors logged in this process, for `status` to show an operator."""

    def __init__(self, capacity: int = RECENT_PROBLEMS):
        super().__init__(level=logging.WARNING)
        self.records: collections.deque[Problem] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.records.append(Problem(time=record.created, level=record.levelname, logger=record.name, message=message))

    def problems(self) -> list[Problem]:
        return list(self.records)


class StatusFile(StatusModel):
    """Written by a server started with --status-file, removed when it exits."""

    pid: int
    url: str
    written_at: float

    @classmethod
    def write(cls, path: Path, url: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(cls(pid=os.getpid(), url=url, written_at=time.time()).model_dump_json())
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> "StatusFile":
        """Raises OSError when absent, ValueError when it is not a status file."""
        return cls.model_validate(json.loads(path.read_text()))

    @staticmethod
    def remove(path: Path) -> None:
        """Removes the file if it is still this process's (a newer server may have replaced it)."""
        try:
            if StatusFile.read(path).pid == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
