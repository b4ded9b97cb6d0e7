"""Swarm client: run a model whose transformer blocks are served by peers of a swarm.

Names are imported on first use (PEP 562), so `python -m client.generate --help` answers without
importing torch, transformers or hivemind.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AutoDistributedModelForCausalLM": "client.model",
    "InferenceSession": "client.session",
    "PingCache": "client.pings",
    "SwarmError": "client.errors",
    "MissingBlocksError": "client.errors",
    "ModelMismatchError": "client.errors",
    "SwarmBusyError": "client.errors",
    "BadRequestError": "client.errors",
    "RetriesExhaustedError": "client.errors",
    "ServerFailure": "client.errors",
    "StepTimeoutError": "client.errors",
    "ServerProvenWrongError": "client.errors",
    "WrongResultWarning": "client.errors",
    "Evidence": "verification.evidence",
    "SpanPlan": "client.routing",
    "forward_span": "client.span",
    "TokenClock": "client.timing",
    "load_tokenizer": "client.tokenizer",
}

__all__ = [
    "AutoDistributedModelForCausalLM",
    "InferenceSession",
    "PingCache",
    "SwarmError",
    "MissingBlocksError",
    "ModelMismatchError",
    "SwarmBusyError",
    "BadRequestError",
    "RetriesExhaustedError",
    "ServerFailure",
    "StepTimeoutError",
    "ServerProvenWrongError",
    "WrongResultWarning",
    "Evidence",
    "SpanPlan",
    "forward_span",
    "TokenClock",
    "load_tokenizer",
]

if TYPE_CHECKING:
    from client.errors import (
        BadRequestError,
        MissingBlocksError,
        ModelMismatchError,
        RetriesExhaustedError,
        ServerFailure,
        ServerProvenWrongError,
        StepTimeoutError,
        SwarmBusyError,
        SwarmError,
        WrongResultWarning,
    )
    from client.model import AutoDistributedModelForCausalLM
    from client.pings import PingCache
    from client.routing import SpanPlan
    from client.session import InferenceSession
    from client.span import forward_span
    from client.timing import TokenClock
    from verification.evidence import Evidence


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
