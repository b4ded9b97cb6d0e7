"""All reads and writes of the swarm's DHT, over hivemind's DHT (a libp2p daemon in a child process).

Every record a server writes lives under a subkey that carries its public key, signed with the
matching private key (hivemind's `RSASignatureValidator`): no peer can overwrite or forge another's
record, and readers learn the writer's peer id from the subkey itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from functools import partial
from typing import Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time

from dht.dialing import dial
from dht.identity import ensure_identity, make_validator, peer_id_of_subkey
from dht.ports import free_port
from dht.records import (
    MAX_BLOCKS,
    MODELS_KEY,
    ModelEntry,
    ModelRecord,
    ServerInfo,
    ServerRecord,
    block_key,
    meta_key,
    parse_server_entry,
)

logger = logging.getLogger(__name__)

DEFAULT_TTL = 90.0
DEFAULT_REFRESH_PERIOD = 30.0
DEFAULT_DHT_TIMEOUT = 30.0


class DHTUnavailableError(RuntimeError):
    """A DHT read or write did not finish in time (no reachable peer, or a stalled DHT process)."""


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: Optional[str] = None,
    client_mode: bool = False,
    nat_port_map: bool = False,
    announce_maddrs: Sequence[str] = (),
    require_peers: bool = True,
) -> tuple[hivemind.DHT, RSASignatureValidator]:
    """Starts a DHT node whose libp2p identity is also its record-signing key.

    Without `identity_path` a fresh identity is made in a private temp file, removed once the node has
    started (its daemon holds the key then: a throwaway key must not pile up on disk). NAT port mapping (UPnP /
    NAT-PMP probes of the LAN gateway) stays off unless the operator opts in. `announce_maddrs`
    (transport addresses, no /p2p part) replace the listen address in what peers learn and dial.
    `require_peers=False` starts alone when no initial peer answers (peers a stranger announced on the
    LAN may not), where by default that is an error.
    """
    throwaway = tempfile.mkdtemp(prefix="swarm-identity-") if identity_path is None else None
    try:
        return _start_dht(
            initial_peers,
            host=host,
            port=port,
            identity_path=identity_path or os.path.join(throwaway, "identity.key"),
            client_mode=client_mode,
            nat_port_map=nat_port_map,
            announce_maddrs=announce_maddrs,
            require_peers=require_peers,
        )
    finally:
        if throwaway is not None:
            shutil.rmtree(throwaway, ignore_errors=True)


def _start_dht(
    initial_peers: Sequence[str],
    *,
    host: str,
    port: int,
    identity_path: str,
    client_mode: bool,
    nat_port_map: bool,
    announce_maddrs: Sequence[str],
    require_peers: bool,
) -> tuple[hivemind.DHT, RSASignatureValidator]:
    identity_path = str(ensure_identity(identity_path))
    validator = make_validator(identity_path)
    family = "ip6" if ":" in host else "ip4"
    dht = hivemind.DHT(
        initial_peers=list(initial_peers),
        start=True,
        client_mode=client_mode,
        identity_path=identity_path,
        record_validators=[validator],
        nat_port_map=nat_port_map,
        use_auto_relay=False,
        auto_nat=False,
        # hivemind's check that an existing identity is not in use starts a throwaway daemon with its own
        # defaults, NAT port mapping (UPnP / NAT-PMP probes of the gateway) and AutoNAT included, whatever
        # this node asks for: never run it. (Two processes sharing an identity file is an operator's
        # mistake that libp2p reports as dial errors.)
        check_if_identity_free=False,
        host_maddrs=[f"/{family}/{host}/tcp/{0 if client_mode else port}"],
        announce_maddrs=list(announce_maddrs) or None,
        ensure_bootstrap_success=require_peers,
    )
    return dht, validator


def public_announce(
    public_ip: Optional[str], host: str, port: int, announce_maddrs: Sequence[str]
) -> tuple[int, list[str]]:
    """The port to listen on and the addresses to announce, given an operator's --public-ip (which
    needs a known port: one is picked if --port is 0) and --announce-maddrs (which win)."""
    if not public_ip or announce_maddrs:
        return port, list(announce_maddrs)
    port = port or free_port(host)
    return port, [f"/{'ip6' if ':' in public_ip else 'ip4'}/{public_ip}/tcp/{port}"]


class SwarmDHT:
    """Typed announce/fetch of server and model records on top of a running hivemind DHT."""

    def __init__(self, dht: hivemind.DHT, validator: RSASignatureValidator, timeout: float = DEFAULT_DHT_TIMEOUT):
        self.dht = dht
        self.validator = validator
        self.timeout = timeout
        self.peer_id: str = dht.peer_id.to_base58()
        # Read once, here, before any event loop runs: hivemind answers this only synchronously.
        self._maddrs = [str(addr) for addr in dht.get_visible_maddrs()]

    def visible_maddrs(self) -> list[str]:
        return list(self._maddrs)

    async def _run(self, what: str, fn):
        """Runs `fn` in the DHT process without blocking this event loop, bounded by `timeout`; at once
        a DHTUnavailableError if that process has exited (a signal sent to the whole process group)."""
        if not self.dht.is_alive():
            raise DHTUnavailableError(f"DHT {what}: the DHT process has exited (exit code {self.dht.exitcode})")
        call = asyncio.ensure_future(self.dht.run_coroutine(fn, return_future=True))
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            while True:  # the process may die during the call (a signal to the whole group): see it at once
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise DHTUnavailableError(f"DHT {what} did not finish within {self.timeout:g} s")
                done, _ = await asyncio.wait([call], timeout=min(left, 0.5))
                if done:
                    return call.result()
                if not self.dht.is_alive():
                    raise DHTUnavailableError(f"DHT {what}: the DHT process has exited (exit code {self.dht.exitcode})")
        finally:
            call.cancel()

    async def meet(self, maddrs: Sequence[str], timeout: float = 15.0) -> bool:
        """Joins the swarm of a peer learned after start (on the LAN, say): dials it at `maddrs` (all
        ending in its /p2p/ id), pings it into the routing table and looks up this node's neighbours
        through it. False if it did not answer."""
        peer_id = maddrs[0].rsplit("/p2p/", 1)[-1]
        return await self._run(
            f"meeting {peer_id}", partial(_meet, peer_id=peer_id, maddrs=list(maddrs), timeout=timeout)
        )

    @property
    def port(self) -> int:
        """The TCP port this node listens on (0 if it has none, e.g. a client-mode node)."""
        for addr in self.visible_maddrs():
            parts = addr.split("/")
            if "tcp" in parts:
                return int(parts[parts.index("tcp") + 1])
        return 0

    async def announce(self, model: str, record: ServerRecord, ttl: float = DEFAULT_TTL) -> None:
        """Stores `record` under every block key it covers, signed under this peer's own subkey."""
        keys = [block_key(model, i) for i in range(record.start_block, record.end_block)]
        await self._run(
            "announce",
            partial(
                _store_many,
                keys=keys,
                subkey=self.validator.local_public_key,
                value=record.to_wire(),
                expiration_time=get_dht_time() + ttl,
            ),
        )

    async def announce_meta(self, model: str, meta: ModelRecord, ttl: float = DEFAULT_TTL) -> None:
        """Model metadata under `M._meta`, and this server's entry in the swarm-wide model list."""
        expiration = get_dht_time() + ttl
        for key, value in ((meta_key(model), meta.to_wire()), (MODELS_KEY, ModelEntry(model=model).to_wire())):
            await self._run(
                "announce",
                partial(
                    _store_many,
                    keys=[key],
                    subkey=self.validator.local_public_key,
                    value=value,
                    expiration_time=expiration,
                ),
            )

    async def fetch_models(self) -> list[str]:
        """Names of every model some live server announces, sorted."""
        raw = await self._run("read", partial(_get_many, keys=[MODELS_KEY]))
        names = set()
        for subkey, (value, _) in raw.get(MODELS_KEY, {}).items():
            entry = ModelEntry.from_wire(value) if peer_id_of_subkey(subkey) else None
            if entry is not None:
                names.add(entry.model)
        return sorted(names)

    async def fetch_servers(self, model: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        """For each block, the valid records of the servers that announce it, keyed by peer id."""
        if not 0 <= num_blocks <= MAX_BLOCKS:
            raise ValueError(f"num_blocks must be within 0..{MAX_BLOCKS}, got {num_blocks}")
        keys = [block_key(model, i) for i in range(num_blocks)]
        raw = await self._run("read", partial(_get_many, keys=keys)) if keys else {}
        result = []
        # A server stores one record under every block it serves: parse each distinct one once (a big
        # swarm has ~10x more (block, record) pairs than records), and routing sees one shared object.
        parsed: dict[tuple, Optional[ServerInfo]] = {}
        for key in keys:
            servers = {}
            for subkey, (value, expiration) in raw.get(key, {}).items():
                seen = (subkey, expiration, repr(value))
                if seen not in parsed:
                    parsed[seen] = parse_server_entry(peer_id_of_subkey(subkey), value, expiration)
                info = parsed[seen]
                if info is not None:
                    servers[info.peer_id] = info
            result.append(servers)
        return result

    async def fetch_block(self, model: str, block: int) -> dict[str, ServerInfo]:
        """The valid records of the servers that announce block `block` of `model`, keyed by peer id."""
        if not 0 <= block < MAX_BLOCKS:
            raise ValueError(f"block must be within 0..{MAX_BLOCKS - 1}, got {block}")
        key = block_key(model, block)
        raw = await self._run("read", partial(_get_many, keys=[key]))
        servers = {}
        for subkey, (value, expiration) in raw.get(key, {}).items():
            info = parse_server_entry(peer_id_of_subkey(subkey), value, expiration)
            if info is not None:
                servers[info.peer_id] = info
        return servers

    async def fetch_meta(self, model: str) -> dict[str, ModelRecord]:
        """The model records announced for `model`, keyed by the peer id that signed each (normally all equal)."""
        raw = await self._run("read", partial(_get_many, keys=[meta_key(model)]))
        records = {}
        for subkey, (value, _) in raw.get(meta_key(model), {}).items():
            peer_id = peer_id_of_subkey(subkey)
            record = ModelRecord.from_wire(value) if peer_id is not None else None
            if record is not None:
                records[peer_id] = record
        return records

    def shutdown(self) -> None:
        self.dht.shutdown()


def agreed_meta(metas: dict[str, ModelRecord], servers: list[dict[str, ServerInfo]]) -> Optional[ModelRecord]:
    """The model record that most of the servers actually announcing blocks sign (ties: the first seen).

    A stranger can write a `_meta` record of its own but cannot make it the majority's: records of
    peers that serve no block count only when no serving peer wrote one."""
    serving = {peer for block in servers for peer in block}
    voters = {peer: meta for peer, meta in metas.items() if peer in serving} or metas
    votes: dict[tuple, list[ModelRecord]] = {}
    for meta in voters.values():
        votes.setdefault(meta.identity(), []).append(meta)
    if not votes:
        return None
    return max(votes.values(), key=len)[0]


async def _store_many(dht, node, keys, subkey, value, expiration_time) -> None:
    return await node.store_many(
        keys=keys,
        values=[value] * len(keys),
        subkeys=[subkey] * len(keys),
        expiration_time=expiration_time,
        num_workers=min(len(keys), 16),
    )


async def _meet(dht, node, peer_id: str, maddrs: list[str], timeout: float) -> bool:
    """Runs inside the DHT process (`SwarmDHT.meet`)."""
    try:
        peer = await dial(node.p2p, peer_id, maddrs, timeout)
    except Exception as e:  # unreachable, or a malformed address from a stranger
        logger.info("could not dial %s: %s", peer_id, e)
        return False
    if await node.protocol.call_ping(peer) is None:
        return False
    await node.find_nearest_nodes([node.node_id])
    return True


async def _get_many(dht, node, keys) -> dict:
    """Runs inside the DHT process; returns plain picklable {key: {subkey: (value, expiration)}}."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"), num_workers=min(len(keys), 16))
    result = {}
    for key, entry in found.items():
        if entry is None or not isinstance(entry.value, (dict, DictionaryDHTValue)):
            continue  # someone wrote a plain value under a block key: not a server record
        result[key] = {subkey: (item.value, item.expiration_time) for subkey, item in entry.value.items()}
    return result
