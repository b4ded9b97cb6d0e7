"""The KV cache's second tier, Redis (`--kv-redis`): pages of the prefix cache that leave the pool go
there, and a later session whose prompt starts the same takes them back instead of computing them
again, on this server or on this server after a restart (the same `--identity`); a session idle too
long goes there whole (`put_session`) and its client takes it up again from there, on this server or
another that reaches the same Redis.

Keys are the prefix cache's hash chains (`swarm.prefix_cache`), rooted in the model, the blocks, what
the server computes in (dtype, quantization, adapter) and the client, so they say everything the KV
depends on. A presence check walks a prompt's keys in order and stops at the first missing one: only
a whole prefix is ever used. Entries expire after `--kv-redis-ttl` seconds.

Redis is not trusted: it may be shared, full, flushed or written by anyone who reaches it. Each
entry carries its digest and this server's signature (its receipt key) over the key and the digest;
one that is missing, malformed, of another shape or dtype, or signed by anyone else is a miss, never
a wrong token. The payload is safetensors, never a pickle.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import re
import secrets
from typing import Any, Optional, Sequence

import msgpack
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.receipts import public_key_hex, sign, verify

logger = logging.getLogger(__name__)

VERSION = 1
KEY_PREFIX = "swarm:kv:"
MAX_ENTRY_BYTES = 64 << 20  # a page bigger than this is not a page of this server's
MAX_SESSION_BYTES = 1 << 30  # a session entry bigger than this is not one of a session this big
SESSION_PREFIX = "swarm:session:"
IDENTITY_KEY = "swarm:tier-id"
MAX_CONNECTIONS = 4  # to Redis at once: many pages leaving the pool together wait their turn


def _signed(key: bytes, digest: str, shape: Sequence[int], dtype: str) -> bytes:
    return f"swarm-kv-page-v{VERSION}|{key.hex()}|{digest}|{list(shape)}|{dtype}".encode()


class RedisTier:
    """Pages [layers, 2, kv_heads, tokens, head_dim] of one span's KV, by prefix key, in Redis."""

    def __init__(self, url: str, signer: Ed25519PrivateKey, ttl: float, timeout: float = 5.0):
        import redis.asyncio

        self.client = redis.asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=MAX_CONNECTIONS
        )
        self._writing = asyncio.Semaphore(MAX_CONNECTIONS - 1)  # one connection stays for reads
        self.signer = signer
        self.public_key = public_key_hex(signer)
        self.ttl = max(1, int(ttl))
        self.stored = 0  # pages written
        self.queries = 0  # pages looked for
        self.hits = 0  # pages taken back
        self._writes: set[asyncio.Task] = set()

    async def identity(self) -> str:
        """Which Redis this is, the same for every server that reaches the same one ("" if it cannot
        be read): servers announce it, so that a client knows which of them can take a session back."""
        try:
            await self.client.set(IDENTITY_KEY, secrets.token_hex(8), nx=True)
            value = await self.client.get(IDENTITY_KEY)
        except Exception as e:
            logger.warning(
                "kv tier: Redis cannot be reached now (%s: %s); pages go nowhere until it can", type(e).__name__, e
            )
            return ""
        text = value.decode() if isinstance(value, bytes) else str(value or "")
        return text if re.fullmatch(r"[0-9a-f]{16}", text) else ""

    def put_later(self, key: bytes, page: torch.Tensor) -> None:
        """Writes `page` under `key` in the background (a page leaving the pool must not wait for Redis)."""
        self._later(self.put(key, page))

    def _later(self, write) -> None:
        """Runs the coroutine `write` in the background, among the writes `flush` waits for."""
        task = asyncio.get_running_loop().create_task(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def put(self, key: bytes, page: torch.Tensor) -> bool:
        payload = await asyncio.to_thread(safetensors.torch.save, {"kv": page.contiguous()})
        digest = hashlib.sha256(payload).hexdigest()
        dtype = str(page.dtype).removeprefix("torch.")
        entry = msgpack.packb(
            {
                "v": VERSION,
                "digest": digest,
                "shape": list(page.shape),
                "dtype": dtype,
                "signer": self.public_key,
                "signature": sign(self.signer, _signed(key, digest, page.shape, dtype)),
                "payload": payload,
            },
            use_bin_type=True,
        )
        try:
            async with self._writing:
                await self.client.set(KEY_PREFIX + key.hex(), entry, ex=self.ttl)
        except Exception as e:  # a full or absent Redis loses the page, nothing else
            logger.info("kv tier: could not store a page: %s: %s", type(e).__name__, e)
            return False
        self.stored += 1
        return True

    async def take(self, keys: Sequence[bytes], shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """The pages of the longest stored prefix of `keys` that are this server's, of `shape` and
        `dtype`, and intact (a page failing any check ends the prefix there)."""
        if not keys:
            return []
        await self.flush()  # a page on its way to Redis may be the one asked for
        self.queries += len(keys)
        names = [KEY_PREFIX + key.hex() for key in keys]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(name)
                present = await pipe.execute()
            run = next((i for i, found in enumerate(present) if not found), len(present))
            values = await self.client.mget(names[:run]) if run else []
        except Exception as e:
            logger.info("kv tier: could not read Redis: %s: %s", type(e).__name__, e)
            return []
        pages = []
        for key, value in zip(keys, values):
            page = await asyncio.to_thread(self._check, key, value, shape, dtype)
            if page is None:
                break
            pages.append(page)
        self.hits += len(pages)
        return pages

    def _check(self, key: bytes, value: Optional[bytes], shape: Sequence[int], dtype: torch.dtype):
        name = str(dtype).removeprefix("torch.")
        if value is None or len(value) > MAX_ENTRY_BYTES:
            return None
        try:
            entry = msgpack.unpackb(value, raw=False)
            digest, payload = entry["digest"], entry["payload"]
            if (
                entry.get("v") != VERSION
                or entry["signer"] != self.public_key
                or list(entry["shape"]) != list(shape)
                or entry["dtype"] != name
                or hashlib.sha256(payload).hexdigest() != digest
                or not verify(self.public_key, _signed(key, digest, shape, name), entry["signature"])
            ):
                return None
            page = safetensors.torch.load(payload)["kv"]
        except Exception:  # whatever Redis holds, it is a miss unless it is exactly one of ours
            return None
        if list(page.shape) != list(shape) or page.dtype != dtype:
            return None
        return page

    def put_session_later(self, session_id: str, header: dict, tensors: Sequence[torch.Tensor]) -> None:
        """`put_session` in the background (from host memory, which must not wait for Redis)."""
        self._later(self.put_session(session_id, header, tensors))

    async def put_session(self, session_id: str, header: dict, tensors: Sequence[torch.Tensor]) -> bool:
        """Keeps an idle session handed to the tier: its `ImportSession` header (whose signature and
        digest cover all of it, checked by whoever takes it back) and its KV chunks and mask."""
        payload = await asyncio.to_thread(
            safetensors.torch.save, {f"t{i}": t.contiguous() for i, t in enumerate(tensors)}
        )
        entry = msgpack.packb(
            {"v": VERSION, "header": header, "count": len(tensors), "payload": payload}, use_bin_type=True
        )
        try:
            async with self._writing:
                await self.client.set(SESSION_PREFIX + session_id, entry, ex=self.ttl)
        except Exception as e:
            logger.info("kv tier: could not keep session %s: %s: %s", session_id, type(e).__name__, e)
            return False
        return True

    async def take_session(self, session_id: str) -> Optional[tuple[dict, list[torch.Tensor]]]:
        """A session kept by `put_session`, once (it is deleted as it is taken): (its header as stored,
        its tensors), or None. What they are worth is for the taker to check against the signature."""
        try:
            value = await self.client.getdel(SESSION_PREFIX + session_id)
        except Exception as e:
            logger.info("kv tier: could not read session %s: %s: %s", session_id, type(e).__name__, e)
            return None
        if value is None or len(value) > MAX_SESSION_BYTES:
            return None
        try:
            entry = msgpack.unpackb(value, raw=False)
            count, header = int(entry["count"]), entry["header"]
            tensors = await asyncio.to_thread(safetensors.torch.load, entry["payload"])
            if (
                entry.get("v") != VERSION
                or not isinstance(header, dict)
                or sorted(tensors) != sorted(f"t{i}" for i in range(count))
            ):
                return None
            return header, [tensors[f"t{i}"] for i in range(count)]
        except Exception:
            return None

    async def flush(self) -> None:
        """Waits for the writes in flight (a server about to leave)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        try:
            await self.client.aclose()
        except Exception:
            pass


class HostTier:
    """What leaves a pool on an accelerator, kept in host memory first (`--kv-host-mbytes`): prefix
    pages, and idle sessions as they would go to Redis. The least recently kept go on to Redis when
    the budget is full (or nowhere, without one). Host memory is this process's own: nothing here is
    checked again when it comes back, as nothing from the pool is."""

    def __init__(self, max_bytes: int, next_tier: Optional[RedisTier] = None):
        self.max_bytes = max_bytes
        self.next_tier = next_tier
        # ("page", key) -> page, or ("session", id) -> (header, tensors)
        self.entries: collections.OrderedDict[tuple[str, Any], Any] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0

    @staticmethod
    def _size(value: Any) -> int:
        return value.nbytes if isinstance(value, torch.Tensor) else sum(t.nbytes for t in value[1])

    def _keep(self, name: tuple[str, Any], value: Any) -> None:
        old = self.entries.pop(name, None)
        if old is not None:
            self.bytes -= self._size(old)
        self.entries[name] = value
        self.bytes += self._size(value)
        while self.bytes > self.max_bytes and self.entries:
            self._pass_on(*self.entries.popitem(last=False))

    def _pass_on(self, name: tuple[str, Any], value: Any) -> None:
        self.bytes -= self._size(value)
        if self.next_tier is None:
            return
        if name[0] == "page":
            self.next_tier.put_later(name[1], value)
        else:
            self.next_tier.put_session_later(name[1], *value)

    def put(self, key: bytes, page: torch.Tensor) -> None:
        """Keeps a prefix `page` (on the host)."""
        self._keep(("page", key), page)

    def take(self, keys: Sequence[bytes], shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """The pages of the longest prefix of `keys` held here (they leave: the session that takes
        them keeps them in the pool)."""
        pages = []
        for key in keys:
            page = self.entries.get(("page", key))
            if page is None or list(page.shape) != list(shape) or page.dtype != dtype:
                break
            pages.append(self.entries.pop(("page", key)))
            self.bytes -= page.nbytes
        self.hits += len(pages)
        return pages

    def put_session(self, session_id: str, header: dict, tensors: Sequence[torch.Tensor]) -> None:
        """Keeps an idle session as `RedisTier.put_session` would."""
        self._keep(("session", session_id), (header, list(tensors)))

    def take_session(self, session_id: str) -> Optional[tuple[dict, list[torch.Tensor]]]:
        """A session kept by `put_session`, once, or None."""
        value = self.entries.pop(("session", session_id), None)
        if value is not None:
            self.bytes -= self._size(value)
        return value

    def spill_all(self) -> None:
        """Everything on to Redis (a server about to leave)."""
        while self.entries:
            self._pass_on(*self.entries.popitem(last=False))
