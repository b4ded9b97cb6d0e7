"""Shared fixtures: tiny random checkpoints and real local swarms of processes on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks.synthetic import make_char_tokenizer, make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

logging.getLogger("hivemind").setLevel(logging.WARNING)
# Throughput caches and converted models of test servers stay out of the user's home.
os.environ["SWARM_CACHE_DIR"] = tempfile.mkdtemp(prefix="swarm-test-cache-")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_path(models_dir) -> Path:
    path = make_random_checkpoint(models_dir / "llama", "llama", num_layers=4, seed=1)
    make_char_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def qwen2_path(models_dir) -> Path:
    # Sharded on purpose: the loader must follow model.safetensors.index.json.
    return make_random_checkpoint(models_dir / "qwen2", "qwen2", num_layers=6, seed=2, max_shard_size="60KB")


def reference_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def wait_for_route(model, *peers: str, timeout: float = 120) -> None:
    """Waits (bounded) until routing starts every chain with `peers`: on a loaded machine a server
    that has just started may miss its first ping and be routed around for a few seconds."""
    remote = model.remote
    deadline = time.monotonic() + timeout
    while [plan.peer_id for plan in remote.runtime.run(remote.make_chain(), 60)][: len(peers)] != list(peers):
        assert time.monotonic() < deadline, f"routing never chose {peers} in {timeout:.0f} s"
        time.sleep(1)


@pytest.fixture(scope="session")
def llama_ref(llama_path):
    return reference_model(llama_path)


@pytest.fixture(scope="session")
def qwen2_ref(qwen2_path):
    return reference_model(qwen2_path)


@pytest.fixture(scope="session")
def llama_swarm(llama_path, tmp_path_factory):
    """Two servers splitting the Llama model's 4 blocks."""
    with LocalSwarm(
        llama_path,
        [(0, 2), (2, 4)],
        server_args=["--max-length", "256", "--throughput", "100"],
        workdir=tmp_path_factory.mktemp("llama-swarm"),
    ) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def qwen2_swarm(qwen2_path, tmp_path_factory):
    """Three servers with uneven ranges over the Qwen2 model's 6 blocks."""
    with LocalSwarm(
        qwen2_path,
        [(0, 1), (1, 4), (4, 6)],
        server_args=["--throughput", "100"],
        workdir=tmp_path_factory.mktemp("qwen2-swarm"),
    ) as swarm:
        yield swarm


@pytest.fixture(scope="session")
def llama_client(llama_swarm, llama_path):
    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, llama_swarm.initial_peers, request_timeout=30
    ) as model:
        yield model


@pytest.fixture(scope="session")
def qwen2_client(qwen2_swarm, qwen2_path):
    with AutoDistributedModelForCausalLM.from_pretrained(
        qwen2_path, qwen2_swarm.initial_peers, request_timeout=30
    ) as model:
        yield model
