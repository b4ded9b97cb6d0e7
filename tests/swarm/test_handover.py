"""swarm.handover: which server takes a leaving server's session, and the digest it is signed over."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dht.records import ServerInfo, ServerRecord
from protocol.errors import ErrorKind, WireError
from swarm.handover import EXPORT_TRIES, Exporter, handover_target, kv_digest, prompt_keys
from swarm.sessions import ServerSession
from tests.helpers.records import record_wire


def info(peer, start, end, **fields) -> ServerInfo:
    wire = record_wire(start_block=start, end_block=end, cache_tokens_free=1000, max_length=256)
    return ServerInfo(peer_id=peer, record=ServerRecord.from_wire({**wire, **fields}), expiration_time=0)


def table(*infos, blocks=4):
    return [{i.peer_id: i for i in infos if i.record.start_block <= b < i.record.end_block} for b in range(blocks)]


def session(start=1, end=3, batch=2, max_length=100) -> ServerSession:
    s = ServerSession(cache=None, batch=batch, max_length=max_length, key="k" * 16)
    s.blocks = (start, end)
    return s


def test_the_session_goes_to_a_server_of_all_its_blocks_in_its_precision_with_the_most_room():
    candidates = [
        info("me", 0, 4),
        info("short", 2, 4),  # misses block 1
        info("bf16", 0, 4, dtype="bfloat16"),
        info("int8", 0, 4, quant="int8"),
        info("draining", 0, 4, state="draining"),
        info("closed", 0, 4, available=False),
        info("too-short", 0, 4, max_length=64),
        info("roomy", 0, 4),
        info("roomier", 1, 3),
    ]
    servers = table(*candidates)
    room = {c.peer_id: 1000 for c in candidates} | {"roomier": 5000, "roomy": 3000}
    assert handover_target(servers, session(), "me", ("float32", "none"), room).peer_id == "roomier"
    room["roomier"] = 150  # less than batch × max_length
    assert handover_target(servers, session(), "me", ("float32", "none"), room).peer_id == "roomy"
    assert handover_target(servers, session(), "me", ("float32", "int8"), room).peer_id == "int8"
    assert handover_target(servers, session(), "me", ("float16", "none"), room) is None


def test_the_digest_covers_every_tensor_and_the_mask():
    chunks = [torch.ones(2, 3), torch.zeros(2, 1)]
    mask = torch.ones(1, 4, dtype=torch.bool)
    base = kv_digest(chunks, mask)
    assert base == kv_digest([c.clone() for c in chunks], mask.clone())
    assert base != kv_digest(chunks, None)
    assert base != kv_digest([chunks[0], torch.zeros(2, 1, dtype=torch.float64)], mask)
    changed = [chunks[0].clone(), chunks[1]]
    changed[0][1, 2] = 2
    assert base != kv_digest(changed, mask)
    # the prompt's block keys and the positions the importer had cached are covered too
    keys = ("a" * 64, "b" * 64)
    with_keys = kv_digest(chunks, mask, keys, 16)
    assert with_keys not in (base, kv_digest(chunks, mask, keys, 0), kv_digest(chunks, mask, keys[:1], 16))
    assert with_keys == kv_digest(chunks, mask, keys, 16)


def test_only_whole_computed_prompt_blocks_are_offered_to_an_importer():
    keys = [bytes([n]) * 32 for n in range(3)]
    done = ServerSession(cache=None, batch=1, max_length=64, prompt_keys=keys, position=40)
    assert prompt_keys(done) == (keys[0].hex(), keys[1].hex())  # 40 positions: two whole blocks of 16
    done.lowest_rewind = 20  # rewound into the second block: only the first is still the prompt's
    assert prompt_keys(done) == (keys[0].hex(),)
    batch = ServerSession(cache=None, batch=2, max_length=64, prompt_keys=keys, position=40)
    assert prompt_keys(batch) == ()


class Flaky(Exporter):
    """An exporter whose exports fail with `errors`, one per try, then succeed."""

    def __init__(self, *errors: Exception):
        self.errors, self.tries = list(errors), 0

    async def export(self, session, start, end, target):
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)
        return "notice"


async def moved(exporter: Exporter) -> bool:
    s = ServerSession(cache=object(), batch=1, max_length=100, key="k" * 16)

    async def at_boundary():  # what the session's step loop does with a move
        _, mover = await s.inbox.get()
        await mover()

    boundary = asyncio.create_task(at_boundary())
    result = await exporter.move(s, 0, 4, info("other", 0, 4))
    await boundary
    return result


@pytest.mark.parametrize(
    "errors, expected, tries",
    [
        ([BrokenPipeError(32, "Broken pipe")], True, 2),  # a broken stream: a fresh one goes through
        ([ConnectionResetError()] * EXPORT_TRIES, False, EXPORT_TRIES),  # bounded
        ([WireError(ErrorKind.BAD_REQUEST, "no room")], False, 1),  # a refusal is not tried again
    ],
    ids=["broken once", "broken every time", "refused"],
)
async def test_an_export_whose_stream_breaks_is_tried_again_but_a_refusal_is_not(errors, expected, tries):
    exporter = Flaky(*errors)
    assert await moved(exporter) is expected
    assert exporter.tries == tries
