"""The prefix cache's Redis tier in a live swarm (a real redis-server on loopback): prompt pages that
leave the pool come back from Redis for a later prompt that starts the same, on the same server and
on the same server after a restart; a damaged entry is a miss; the output is transformers' always."""

from __future__ import annotations

import pytest
import redis
import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm
from swarm.kv_tier import KEY_PREFIX
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.skipif(RedisServer.unavailable() is not None, reason=str(RedisServer.unavailable()))
NEW_TOKENS = 4


def run(model, ref, ids):
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
        cached = session.cached_tokens
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(output, expected)
    return cached


def test_prompt_pages_come_back_from_redis_after_eviction_and_after_a_restart(model6, ref6, tmp_path):
    first = torch.randint(3, 100, (1, 68), generator=torch.Generator().manual_seed(1))
    second = torch.randint(3, 100, (1, 68), generator=torch.Generator().manual_seed(2))
    identity = tmp_path / "server.key"
    with RedisServer() as store:
        args = ["--kv-redis", store.url, "--prefix-cache-tokens", "64", "--identity", str(identity)]
        with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
            server = swarm.add_server(0, 6, *args)
            with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
                assert run(model, ref6, first) == 0
                assert run(model, ref6, first) == 64  # from the pool
                assert run(model, ref6, second) == 0  # its pages push the first prompt's out, to Redis
                assert run(model, ref6, first) == 64  # back from Redis
                server.stop()  # at exit, the pool's pages go to Redis too
                swarm.add_server(0, 6, *args)  # the same server again: a new process, the same identity
                assert run(model, ref6, second) == 64
                # A damaged entry is a miss: the first prompt's pages (in Redis, not in the pool, which
                # holds the second's now) are computed again, exactly.
                raw = redis.Redis.from_url(store.url)
                keys = raw.keys(KEY_PREFIX + "*")
                assert len(keys) >= 8, keys  # both prompts' 4 pages
                for key in keys:
                    raw.set(key, b"garbage")
                assert run(model, ref6, first) == 0
