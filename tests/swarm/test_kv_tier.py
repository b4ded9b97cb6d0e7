"""swarm.kv_tier against a real redis-server: pages come back as they went in, only a whole prefix,
only this server's own, intact, of the right shape, and they expire."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import redis
import torch

from dht.identity import ensure_identity, make_validator, receipt_signer
from swarm.kv_tier import KEY_PREFIX, HostTier, RedisTier
from tests.helpers.redis_server import RedisServer

pytestmark = pytest.mark.skipif(RedisServer.unavailable() is not None, reason=str(RedisServer.unavailable()))
SHAPE = (3, 2, 2, 16, 4)


def signer(path):
    return receipt_signer(make_validator(str(ensure_identity(str(path)))))


@pytest.fixture
def redis_url():
    with RedisServer() as server:
        yield server.url


def run(coro):
    return asyncio.run(coro)


def test_pages_come_back_only_as_a_whole_intact_prefix_of_this_server_s_own(redis_url, tmp_path):
    keys = [bytes([i]) * 32 for i in range(4)]
    pages = [torch.randn(SHAPE) for _ in keys]
    raw = redis.Redis.from_url(redis_url)

    async def scenario():
        tier = RedisTier(redis_url, signer(tmp_path / "me.key"), ttl=600)
        for key, page in zip(keys, pages):
            assert await tier.put(key, page)
        back = await tier.take(keys, SHAPE, torch.float32)
        assert len(back) == 4 and all(torch.equal(a, b) for a, b in zip(back, pages))
        assert await tier.take(keys, (3, 2, 2, 16, 8), torch.float32) == []  # another span's shape
        assert await tier.take(keys, SHAPE, torch.bfloat16) == []
        stranger = RedisTier(redis_url, signer(tmp_path / "stranger.key"), ttl=600)
        assert await stranger.take(keys, SHAPE, torch.float32) == []  # not its own: a miss
        raw.delete(KEY_PREFIX + keys[2].hex())  # a hole: only what comes before it
        assert len(await tier.take(keys, SHAPE, torch.float32)) == 2
        entry = msgpack.unpackb(raw.get(KEY_PREFIX + keys[1].hex()), raw=False)
        entry["payload"] = entry["payload"][:-8] + b"\0" * 8  # tampered bytes: the digest no longer holds
        raw.set(KEY_PREFIX + keys[1].hex(), msgpack.packb(entry, use_bin_type=True))
        assert len(await tier.take(keys, SHAPE, torch.float32)) == 1
        raw.set(KEY_PREFIX + keys[0].hex(), b"not an entry at all")
        assert await tier.take(keys, SHAPE, torch.float32) == []
        await tier.close()
        await stranger.close()

    run(scenario())
    assert 0 < raw.ttl(KEY_PREFIX + keys[3].hex()) <= 600  # entries expire


def test_an_absent_redis_is_a_miss_not_an_error(tmp_path):
    async def scenario():
        tier = RedisTier("redis://127.0.0.1:9/0", signer(tmp_path / "me.key"), ttl=60, timeout=1)
        assert not await tier.put(b"k" * 32, torch.zeros(SHAPE))
        assert await tier.take([b"k" * 32], SHAPE, torch.float32) == []
        await tier.close()

    run(scenario())


def test_host_memory_keeps_the_latest_pages_and_sends_the_oldest_on_to_redis(redis_url, tmp_path):
    keys = [bytes([i]) * 32 for i in range(4)]
    pages = [torch.randn(SHAPE) for _ in keys]

    async def scenario():
        tier = RedisTier(redis_url, signer(tmp_path / "me.key"), ttl=60)
        host = HostTier(max_bytes=2 * pages[0].nbytes, next_tier=tier)
        for key, page in zip(keys, pages):
            host.put(key, page)
        assert list(host.entries) == [("page", key) for key in keys[2:]] and host.bytes == 2 * pages[0].nbytes
        assert host.take(keys, SHAPE, torch.float32) == []  # the prefix starts with a page sent on
        from_redis = await tier.take(keys, SHAPE, torch.float32)
        assert len(from_redis) == 2 and torch.equal(from_redis[1], pages[1])
        taken = host.take(keys[2:], SHAPE, torch.float32)
        assert [torch.equal(a, b) for a, b in zip(taken, pages[2:])] == [True, True] and not host.entries
        await tier.close()

    run(scenario())


def test_host_memory_keeps_idle_sessions_and_sends_the_oldest_on_to_redis(redis_url, tmp_path):
    chunks = [torch.randn(SHAPE) for _ in range(2)]

    async def scenario():
        tier = RedisTier(redis_url, signer(tmp_path / "me.key"), ttl=60)
        host = HostTier(max_bytes=3 * chunks[0].nbytes, next_tier=tier)
        host.put_session("older-session", {"position": 16}, chunks)
        host.put_session("newer-session", {"position": 32}, chunks)  # over budget: the older one goes on
        await tier.flush()
        assert host.bytes == 2 * chunks[0].nbytes
        header, tensors = host.take_session("newer-session")
        assert header == {"position": 32} and all(torch.equal(a, b) for a, b in zip(tensors, chunks))
        assert host.take_session("newer-session") is None and host.bytes == 0  # taken once
        assert host.take_session("older-session") is None
        header, tensors = await tier.take_session("older-session")
        assert header == {"position": 16} and all(torch.equal(a, b) for a, b in zip(tensors, chunks))
        await tier.close()

    run(scenario())
