"""Shared fixtures: tiny random checkpoints and real local swarms of processes on 127.0.0.1."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from blocks.synthetic import make_char_tokenizer, make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm
from tests.helpers.models import reference_model

logging.getLogger("hivemind").setLevel(logging.WARNING)
# Throughput caches and converted models of test servers stay out of the user's home.
os.environ["SWARM_CACHE_DIR"] = tempfile.mkdtemp(prefix="swarm-test-cache-")
atexit.register(shutil.rmtree, os.environ["SWARM_CACHE_DIR"], ignore_errors=True)


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


@pytest.fixture(scope="session")
def model6(models_dir) -> Path:
    """Six Llama blocks: enough for overlapping ranges, failover and spot checks in one swarm."""
    return make_random_checkpoint(models_dir / "llama6", "llama", num_layers=6, seed=5)


@pytest.fixture(scope="session")
def ref6(model6):
    return reference_model(model6)


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
