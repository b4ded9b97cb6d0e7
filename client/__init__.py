"""Swarm client: run a model whose transformer blocks are served by peers of a swarm."""

from client.errors import (
    BadRequestError,
    MissingBlocksError,
    ModelMismatchError,
    RetriesExhaustedError,
    ServerFailure,
    SwarmBusyError,
    SwarmError,
)
from client.model import AutoDistributedModelForCausalLM
from client.session import InferenceSession

__all__ = [
    "AutoDistributedModelForCausalLM",
    "InferenceSession",
    "SwarmError",
    "MissingBlocksError",
    "ModelMismatchError",
    "SwarmBusyError",
    "BadRequestError",
    "RetriesExhaustedError",
    "ServerFailure",
]
