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


def test_an_idle_session_goes_to_redis_and_on_from_there_even_when_its_server_is_gone(model6, ref6, tmp_path):
    """Idle past --session-timeout, a session is kept in Redis instead of dropped: its client goes on
    from there, on the same server, or on another that shares the Redis when that one has died."""

    from tests.helpers.models import wait_for_route

    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    expected = ref6.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    with RedisServer() as store:
        args = ["--kv-redis", store.url, "--session-timeout", "2"]
        with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
            first = swarm.add_server(0, 6, *args, "--throughput", "100000")
            second = swarm.add_server(0, 6, *args, "--throughput", "1")  # routed to only once the first is gone
            # The client's default request timeout: 10 s expired once in a loaded run (the client banned
            # the first server for it and went on through the second, so the chain was not the one checked).
            with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
                wait_for_route(model, first.peer_id)
                with model.inference_session(max_length=ids.shape[1] + 30) as session:
                    model.generate(ids, max_new_tokens=10, session=session)
                    kept_idle(first, 1)  # idle: the session goes to Redis, and on from there on the same server
                    model.generate(None, max_new_tokens=10, session=session)
                    logs = "\n---\n".join(server.log_path.read_text()[-3000:] for server in (first, second))
                    assert session.chain == [(first.peer_id, 0, 6)] and session.moves == 1, logs
                    kept_idle(first, 2)  # idle again; then its server dies (its notice delivered, or lost
                    # with it: the client then asks the tier itself, through another server)
                    first.kill()  # SIGKILL to its process group (its p2pd daemon too), as a crash would
                    output = model.generate(None, max_new_tokens=10, session=session)
                    assert session.chain == [(second.peer_id, 0, 6)]
                    assert session.moves >= 2 and session.replayed_tokens == 0
                assert model.convicted == {}
    assert torch.equal(output, expected)


def test_pages_that_leave_the_pool_wait_in_host_memory_first(model6, ref6, tmp_path):
    """--kv-host-mbytes (meant for a pool on an accelerator; the same code on a CPU pool): evicted pages
    come back from host memory, without any Redis."""
    first = torch.randint(3, 100, (1, 68), generator=torch.Generator().manual_seed(4))
    second = torch.randint(3, 100, (1, 68), generator=torch.Generator().manual_seed(5))
    args = ["--prefix-cache-tokens", "64", "--kv-host-mbytes", "16"]
    with LocalSwarm(model6, [(0, 6)], server_args=args, workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
            assert run(model, ref6, first) == 0
            assert run(model, ref6, second) == 0  # the first prompt's pages go to host memory
            assert run(model, ref6, first) == 64  # and come back from there


def test_an_idle_session_waits_in_host_memory_without_any_redis(model6, ref6, tmp_path):
    """--kv-host-mbytes alone: a session idle past --session-timeout leaves the pool for host memory,
    and its client goes on from there on the same server, nothing replayed."""

    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(6))
    expected = ref6.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    args = ["--kv-host-mbytes", "16", "--session-timeout", "2"]
    with LocalSwarm(model6, [(0, 6)], server_args=args, workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
            with model.inference_session(max_length=ids.shape[1] + 20) as session:
                model.generate(ids, max_new_tokens=10, session=session)
                kept_idle(swarm.servers[0], 1)  # idle: the session goes to host memory
                output = model.generate(None, max_new_tokens=10, session=session)
                assert (session.moves, session.replayed_tokens, session.failovers) == (1, 0, 0)
    assert torch.equal(output, expected)


def kept_idle(server, times: int) -> None:
    """Waits (bounded) until `server` has sent an idle session to its KV tier `times` times in all."""
    import time

    deadline = time.monotonic() + 120
    while server.log_path.read_text().count("kept in the KV tier") < times:
        assert time.monotonic() < deadline, "the idle session never left the pool"
        time.sleep(0.2)
