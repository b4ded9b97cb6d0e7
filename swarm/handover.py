"""Handing open sessions to other servers with their KV caches, so that a server can leave (drain)
without its clients replaying anything.

The exporting server waits for a session to reach a step boundary, copies the KV cache of its
positions so far, and streams it to a server that serves the same blocks in the same precision
(`rpc_import`, `ImportSession` then chunks of at most `CHUNK_BYTES`), signed with its receipt key over
a digest of all of it. The importer checks everything (who sends it, model, blocks, precision,
shapes, dtype, the digest, the signature) before it keeps the session for its client. The exporter
then tells the client (`Moved`, signed the same way) and ends the session here; the client attaches
to the importer (`OpenSession.resume`) at the same position and goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Callable, Optional, Sequence

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import P2P, P2PDaemonError
from hivemind.proto import runtime_pb2

from bridge.dial import iterate, reach
from dht.records import ServerInfo, ServerState
from protocol.messages import (
    MAX_PREFIX_KEYS,
    PREFIX_BLOCK_TOKENS,
    RPC_IMPORT,
    ImportHeld,
    ImportProbe,
    ImportSession,
    Moved,
    SessionImported,
    pack,
    read_header,
)
from protocol.receipts import export_message, sign
from swarm.sessions import ServerSession

logger = logging.getLogger(__name__)

CHUNK_BYTES = 2 << 20  # KV bytes per message of an export
EXPORT_TIMEOUT = 60.0  # seconds one export may take, dial included
EXPORT_TRIES = 2  # a libp2p stream can break under load (seen: BrokenPipeError); a fresh one usually goes through
TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, P2PDaemonError)
BOUNDARY_TIMEOUT = 30.0  # seconds a session may take to finish the step it is computing before it moves


class KVDigest:
    """SHA-256 over an export's tensors in order (shapes, dtypes and bytes), after the prompt's block
    keys and the positions the importer had cached, when there are any; fed a tensor at a time, so
    that an importer hashes each chunk as it comes."""

    def __init__(self, prefix_keys: Sequence[str] = (), skip: int = 0):
        self._sha = hashlib.sha256()
        if prefix_keys or skip:
            self._sha.update(f"skip {skip}|{','.join(prefix_keys)}|".encode())

    def add(self, tensor: torch.Tensor) -> None:
        self._sha.update(f"{list(tensor.shape)}|{tensor.dtype}|".encode())
        self._sha.update(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))  # no copy

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def kv_digest(
    chunks: list[torch.Tensor], mask: Optional[torch.Tensor], prefix_keys: Sequence[str] = (), skip: int = 0
) -> str:
    """The `KVDigest` of a whole export: its chunks, then its mask if any."""
    digest = KVDigest(prefix_keys, skip)
    for tensor in [*chunks, *([mask] if mask is not None else [])]:
        digest.add(tensor)
    return digest.hexdigest()


class Exporter:
    """Moves sessions of this server (`model`, signing with `signer`, peer `peer_id`) to others."""

    def __init__(
        self,
        p2p: P2P,
        model: str,
        peer_id: str,
        signer: Ed25519PrivateKey,
        precision: Callable[[ServerSession], str],
        kv_bytes_per_token: Callable[[], int],
        span_start: Callable[[], int],
        span_length: Callable[[], int],
    ):
        self.p2p = p2p
        self.model = model
        self.peer_id = peer_id
        self.signer = signer
        self.precision = precision
        self.kv_bytes_per_token = kv_bytes_per_token  # of the whole span served here
        self.span_start = span_start
        self.span_length = span_length

    async def move(self, session: ServerSession, start: int, end: int, target: ServerInfo) -> bool:
        """Moves `session` (blocks [start, end) of this server's span) to `target` once it reaches a
        step boundary; False
        (logged) if the target would not take it or the session ended first: it then stays here."""
        moved: asyncio.Future = asyncio.get_running_loop().create_future()

        async def at_boundary() -> Optional[runtime_pb2.ExpertResponse]:
            loop, notice = asyncio.get_running_loop(), None
            deadline = loop.time() + EXPORT_TIMEOUT
            for attempt in range(1, EXPORT_TRIES + 1):
                try:
                    notice = await asyncio.wait_for(self.export(session, start, end, target), deadline - loop.time())
                    break
                except Exception as e:  # the session simply stays here, or the stream broke and we try again
                    why = f"{type(e).__name__}: {e}"
                    if isinstance(e, TRANSPORT_ERRORS) and attempt < EXPORT_TRIES and loop.time() < deadline:
                        logger.info("handing session %s to %s: %s; trying again", session.key, target.peer_id, why)
                        continue
                    logger.warning("could not hand session %s to %s: %s", session.key, target.peer_id, why)
                    break
            if not moved.done():
                moved.set_result(notice is not None)
            return notice

        if not session.move_at_boundary(at_boundary):
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(moved), BOUNDARY_TIMEOUT + EXPORT_TIMEOUT)
        except asyncio.TimeoutError:
            return False

    async def package(
        self, session: ServerSession, start: int, end: int, moved_to: str, skip: int = 0
    ) -> tuple[ImportSession, list[torch.Tensor]]:
        """What an import of `session` (blocks [start, end)) by `moved_to` needs: the signed header,
        and the KV chunks [layers · 2 · batch, kv_heads, tokens, head_dim] of positions [skip, position)
        then the mask, if any (the importer holds the prompt's first `skip` positions already)."""
        position = session.position
        per_token = self.kv_bytes_per_token() * session.batch * (end - start) // max(1, self.span_length())
        chunk_tokens = max(1, CHUNK_BYTES // max(1, per_token))
        first, count = start - self.span_start(), end - start
        exported = await asyncio.to_thread(session.cache.export, position, chunk_tokens, first, count, skip)
        # [layers · 2 · batch, kv_heads, tokens, head_dim]: four dimensions, as messages carry
        chunks = [chunk.reshape(-1, *chunk.shape[3:]) for chunk in exported]
        mask = session.mask[:, :position].contiguous() if session.mask is not None else None
        keys = prompt_keys(session)
        digest = await asyncio.to_thread(kv_digest, chunks, mask, keys, skip)
        precision = self.precision(session)
        message = export_message(
            self.model,
            start,
            end,
            session.key,
            precision,
            session.batch,
            session.max_length,
            position,
            digest,
            moved_to,
        )
        header = ImportSession(
            model=self.model,
            start_block=start,
            end_block=end,
            batch_size=session.batch,
            max_length=session.max_length,
            position=position,
            session_id=session.key,
            route_key=session.route_key.hex(),
            owner=session.peer,
            exporter=self.peer_id,
            precision=precision,
            adapter=session.adapter.name if session.adapter is not None else "",
            last_step_id=session.last_step_id,
            chunks=len(chunks),
            masked=mask is not None,
            skip=skip,
            prefix_keys=keys,
            digest=digest,
            signature=sign(self.signer, message),
        )
        return header, chunks + ([mask] if mask is not None else [])

    async def export(
        self, session: ServerSession, start: int, end: int, target: ServerInfo
    ) -> runtime_pb2.ExpertResponse:
        """Streams `session` to `target` (only what `target` does not cache of its prompt already);
        the client's `Moved` notice once `target` has taken it."""
        keys = prompt_keys(session)
        held: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        packaged: asyncio.Future[ImportSession] = asyncio.get_running_loop().create_future()

        async def requests():
            skip = 0
            if keys:
                yield pack(ImportProbe(start_block=start, probe_keys=keys), request=True)
                skip = await held
            header, tensors = await self.package(session, start, end, target.peer_id, skip)
            packaged.set_result(header)
            yield pack(header, [], request=True)
            for tensor in tensors:
                yield pack(None, [tensor], request=True)

        record = target.record
        destination = await reach(self.p2p, target.peer_id, record.addrs, record.bridge_addrs, EXPORT_TIMEOUT)
        replies = await iterate(self.p2p, destination, RPC_IMPORT, requests())
        try:
            if keys:
                tokens = read_header(await anext(replies), ImportHeld).tokens
                if tokens > len(keys) * PREFIX_BLOCK_TOKENS or tokens % PREFIX_BLOCK_TOKENS:
                    raise ValueError(f"{target.peer_id} claims {tokens} cached positions of {session.position}")
                held.set_result(tokens)
            read_header(await anext(replies), SessionImported)
        finally:
            held.cancel()  # a failed import: the stream's writer stops waiting
            await replies.aclose()
        header = packaged.result()
        logger.info(
            "session %s: handed %d positions to %s (%d of them sent, %d cached there)",
            session.key,
            header.position,
            target.peer_id,
            header.position - header.skip,
            header.skip,
        )
        return pack(
            Moved(
                moved_to=target.peer_id,
                addrs=record.addrs,
                position=header.position,
                digest=header.digest,
                signature=header.signature,
            ),
            request=False,
        )


def prompt_keys(session: ServerSession) -> tuple[str, ...]:
    """The prefix-cache keys (hex) of the prompt blocks `session` holds as computed from its prompt
    (none for a batch: the prefix cache keeps batches of one only)."""
    if session.batch != 1:
        return ()
    blocks = min(session.kept_prompt_tokens(PREFIX_BLOCK_TOKENS) // PREFIX_BLOCK_TOKENS, MAX_PREFIX_KEYS)
    return tuple(key.hex() for key in session.prompt_keys[:blocks])


def can_take(
    info: ServerInfo, session: ServerSession, own_peer_id: str, computes_in: tuple[str, str], room: dict[str, int]
) -> bool:
    """Whether server `info` can take `session` over: online and available, serving all its blocks in
    the same (dtype, quantization) and its adapter, accepting its length, with cache `room` for it."""
    start, end = session.blocks
    record = info.record
    return not (
        info.peer_id == own_peer_id
        or record.state != ServerState.ONLINE
        or not record.available
        or not record.start_block <= start < end <= record.end_block
        or (record.dtype, record.quant) != computes_in
        or (session.adapter is not None and session.adapter.name not in record.adapters)
        or record.max_length < session.max_length
        or room.get(info.peer_id, 0) < session.batch * session.max_length
        or not (record.reachable or record.bridge_addrs)
    )


def handover_target(
    servers: list[dict[str, ServerInfo]],
    session: ServerSession,
    own_peer_id: str,
    computes_in: tuple[str, str],
    room: dict[str, int],
) -> Optional[ServerInfo]:
    """The server to hand `session` to on a drain: one that `can_take` it, with the most cache room."""
    start = session.blocks[0]
    best: Optional[ServerInfo] = None
    for info in servers[start].values() if start < len(servers) else ():
        if can_take(info, session, own_peer_id, computes_in, room) and (
            best is None or room[info.peer_id] > room[best.peer_id]
        ):
            best = info
    return best
