"""The server's RPC handler driven in process: sessions on a retired span end clearly, a step pushed twice
is computed once, a push counts only as the client sealed it, the attention mask stays on the server, a
round's pushes go out before its replies."""

from __future__ import annotations

import asyncio
import gc
import uuid
import weakref
from types import SimpleNamespace

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from protocol.errors import ErrorKind, WireError
from protocol.messages import (
    Hop,
    OpenSession,
    Push,
    PushAccepted,
    SessionOpened,
    Step,
    StepDone,
    pack,
    read_header,
)
from protocol.routes import new_route_key, seal_route
from protocol.tensors import read_tensors
from swarm.batching import StepScheduler
from swarm.cache import CacheBudget
from swarm.compute import ComputeThread
from swarm.handler import BlockHandler, Limits


async def test_sessions_left_on_a_retired_span_end_with_a_clear_error_and_free_everything(llama_path):
    checkpoint = Checkpoint(llama_path)
    span = load_span(checkpoint, 0, 2, torch.float32, "cpu")
    hidden_size = span.config.hidden_size
    budget = CacheBudget(1000)
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=64)
    handler = BlockHandler(
        "m",
        span,
        budget,
        scheduler,
        Limits(max_length=64, max_batch_size=4, max_chunk_tokens=64, session_timeout=60),
        version="test",
        state=lambda: "online",
        accepting=lambda: True,
    )
    queue: asyncio.Queue = asyncio.Queue()
    fresh_queue: asyncio.Queue = asyncio.Queue()

    async def requests(source=queue):
        while (message := await source.get()) is not None:
            yield message

    replies = handler.rpc_inference(requests(), SimpleNamespace(remote_id="a-peer"))
    try:
        queue.put_nowait(
            pack(OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1), request=True)
        )
        read_header(await anext(replies), SessionOpened)
        queue.put_nowait(pack(Step(position=0), [torch.randn(1, 3, hidden_size)], request=True))
        read_header(await anext(replies), StepDone)
        assert budget.free == 1000 - 16 and handler.open_sessions == 1

        old_weights = weakref.ref(span)
        del span
        assert handler.retire_span("server moved from blocks 0:2 to other blocks") == 1
        assert budget.free == 1000 and handler.open_sessions == 0  # given back at once, not when the client returns
        gc.collect()
        assert old_weights() is None  # nothing holds the old blocks while the new ones load

        queue.put_nowait(pack(Step(position=3), [torch.randn(1, 1, hidden_size)], request=True))
        with pytest.raises(WireError) as error:
            read_header(await anext(replies), StepDone)
        assert error.value.kind == ErrorKind.WRONG_MODEL and "moved from blocks 0:2" in error.value.message

        # While no span is loaded, a new session is refused as busy (the client goes elsewhere).
        fresh = handler.rpc_inference(requests(fresh_queue), SimpleNamespace(remote_id="b-peer"))
        fresh_queue.put_nowait(
            pack(OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1), request=True)
        )
        with pytest.raises(WireError) as error:
            read_header(await anext(fresh), SessionOpened)
        assert error.value.kind == ErrorKind.BUSY and budget.free == 1000
    finally:
        scheduler.close()
        compute.shutdown()


class InProcessServer:
    """A BlockHandler on blocks 0:2 of a checkpoint, driven without sockets; `stream()` is one
    client stream to it: (queue of requests to put, iterator of replies)."""

    def __init__(self, path, prefix_tokens: int = 0):
        self.span = load_span(Checkpoint(path), 0, 2, torch.float32, "cpu")
        self.compute = ComputeThread()
        self.scheduler = StepScheduler(self.compute, max_batch_tokens=64)
        self.handler = BlockHandler(
            "m",
            self.span,
            CacheBudget(1000, prefix_tokens),
            self.scheduler,
            Limits(max_length=64, max_batch_size=4, max_chunk_tokens=64, session_timeout=60),
            version="test",
            state=lambda: "online",
            accepting=lambda: True,
        )
        self.queues: list[asyncio.Queue] = []

    def stream(self, peer: str):
        queue: asyncio.Queue = asyncio.Queue()
        self.queues.append(queue)

        async def requests():
            while (message := await queue.get()) is not None:
                yield message

        return queue, self.handler.rpc_inference(requests(), SimpleNamespace(remote_id=peer))

    def close(self) -> None:
        for queue in self.queues:
            queue.put_nowait(None)
        self.scheduler.close()
        self.compute.shutdown()


async def test_a_step_pushed_twice_is_computed_once_and_the_session_goes_on(llama_path):
    """After a failover the replacement pushes a step the next server may already have had."""
    server = InProcessServer(llama_path)
    span, handler, size = server.span, server.handler, server.span.config.hidden_size
    queue, replies = server.stream("client")
    key = uuid.uuid4().hex
    context = SimpleNamespace(remote_id="previous-server")
    try:
        queue.put_nowait(
            pack(
                OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1, session_id=key),
                request=True,
            )
        )
        read_header(await anext(replies), SessionOpened)
        prompt = torch.randn(1, 3, size)
        pushed = pack(Push(position=0, step_id=7, session_id=key), [prompt], request=True)
        for _ in range(2):
            read_header(await handler.rpc_push(pushed, context), PushAccepted)
        first = await asyncio.wait_for(anext(replies), 60)
        assert read_header(first, StepDone).position == 3
        torch.testing.assert_close(read_tensors(first, max_count=1)[0], span.forward(prompt), atol=1e-5, rtol=0)
        # The duplicate was dropped: the next reply is the client's own next step.
        queue.put_nowait(pack(Step(position=3, step_id=8), [torch.randn(1, 1, size)], request=True))
        assert read_header(await asyncio.wait_for(anext(replies), 60), StepDone).position == 4
        # Another client cannot open a session under the same id.
        other_queue, other = server.stream("someone-else")
        other_queue.put_nowait(
            pack(
                OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1, session_id=key),
                request=True,
            )
        )
        with pytest.raises(WireError, match="already open"):
            read_header(await asyncio.wait_for(anext(other), 60), SessionOpened)
    finally:
        server.close()


async def test_the_attention_mask_stays_on_the_server_and_steps_carry_only_new_columns(llama_path):
    server = InProcessServer(llama_path)
    span, size = server.span, server.span.config.hidden_size
    queue, replies = server.stream("client")
    generator = torch.Generator().manual_seed(3)
    prompt, token = torch.randn(2, 4, size, generator=generator), torch.randn(2, 1, size, generator=generator)
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    try:
        queue.put_nowait(
            pack(
                OpenSession(
                    model="m", start_block=0, end_block=2, max_length=16, batch_size=2, session_id=uuid.uuid4().hex
                ),
                request=True,
            )
        )
        read_header(await anext(replies), SessionOpened)
        queue.put_nowait(pack(Step(position=0, step_id=1), [prompt, padding], request=True))
        read_header(await asyncio.wait_for(anext(replies), 60), StepDone)
        # The next step sends no mask at all: the server still knows the first row starts with padding.
        queue.put_nowait(pack(Step(position=4, step_id=2), [token], request=True))
        reply = await asyncio.wait_for(anext(replies), 60)
        reference_cache = span.new_cache()
        span.forward(prompt, reference_cache, padding)
        want = span.forward(token, reference_cache, torch.cat([padding, torch.ones(2, 1, dtype=torch.int64)], dim=1))
        torch.testing.assert_close(read_tensors(reply, max_count=1)[0], want, atol=1e-5, rtol=0)
        # A mask of the whole session so far is not what a step carries any more: a clear error.
        queue.put_nowait(pack(Step(position=5, step_id=3), [token, torch.ones(2, 6, dtype=torch.int64)], request=True))
        with pytest.raises(WireError, match=r"new tokens must be .* shape \[2, 1\]"):
            read_header(await asyncio.wait_for(anext(replies), 60), StepDone)
    finally:
        server.close()


async def test_a_push_opens_only_what_the_client_sealed_a_bad_one_blames_the_pusher_and_a_late_one_is_dropped(
    llama_path,
):
    """A push the client did not seal for this step (another position, a forged rewind, no seal) or of the
    wrong dtype is answered on the client's stream as BAD_PUSH naming the pusher, and leaves the session
    as it was; a push that comes again after later steps were computed is dropped."""
    server = InProcessServer(llama_path)
    span, handler, size = server.span, server.handler, server.span.config.hidden_size
    queue, replies = server.stream("client")
    key, route_key = uuid.uuid4().hex, new_route_key()
    me = Hop(peer_id="this-server", session_id=key, dtype="float32")

    def push(step_id, position, tensor, rewind=False, sealed_for=None):
        sealed_for = sealed_for or (step_id, position, rewind)
        _, sealed = seal_route([(me, route_key)], *sealed_for)
        header = Push(position=position, step_id=step_id, rewind=rewind, session_id=key, sealed_route=sealed)
        return pack(header, [tensor], request=True)

    async def pushed_by(pusher, message):
        read_header(await handler.rpc_push(message, SimpleNamespace(remote_id=pusher)), PushAccepted)
        return await asyncio.wait_for(anext(replies), 60)

    try:
        queue.put_nowait(
            pack(
                OpenSession(
                    model="m",
                    start_block=0,
                    end_block=2,
                    max_length=16,
                    batch_size=1,
                    session_id=key,
                    route_key=route_key,
                ),
                request=True,
            )
        )
        read_header(await anext(replies), SessionOpened)
        prompt, token = torch.randn(1, 3, size), torch.randn(1, 1, size)
        bad = {
            "unsealed": pack(Push(position=0, step_id=1, session_id=key), [prompt], request=True),
            "moved": push(1, 0, prompt, sealed_for=(1, 2, False)),
            "rewound": push(1, 0, prompt, rewind=True, sealed_for=(1, 0, False)),
            "float64": push(1, 0, prompt.double()),
        }
        for pusher, message in bad.items():
            with pytest.raises(WireError) as error:
                read_header(await pushed_by(pusher, message), StepDone)
            assert error.value.kind == ErrorKind.BAD_PUSH and pusher in error.value.message
        # A pusher refused once is not heard again in this session.
        with pytest.raises(WireError, match="refused"):
            read_header(await handler.rpc_push(push(2, 0, prompt), SimpleNamespace(remote_id="float64")), PushAccepted)

        assert read_header(await pushed_by("previous", push(5, 0, prompt)), StepDone).position == 3
        assert read_header(await pushed_by("previous", push(6, 3, token)), StepDone).position == 4
        # Step 5 again, late (its pusher was given up on, say): dropped, not an error that ends the session.
        read_header(await handler.rpc_push(push(5, 0, prompt), SimpleNamespace(remote_id="late")), PushAccepted)
        queue.put_nowait(pack(Step(position=4), [token], request=True))
        reply = await asyncio.wait_for(anext(replies), 60)
        assert read_header(reply, StepDone).position == 5
        cache = span.new_cache()
        span.forward(prompt, cache)
        span.forward(token, cache)
        torch.testing.assert_close(read_tensors(reply, max_count=1)[0], span.forward(token, cache), atol=1e-5, rtol=0)
    finally:
        server.close()


async def test_a_prompt_kept_by_the_prefix_cache_is_reused_by_its_client_only_and_bad_prompt_ids_are_refused(
    llama_path,
):
    server = InProcessServer(llama_path, prefix_tokens=1000)
    span, size = server.span, server.span.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 48, size, generator=generator)
    ids = torch.randint(0, span.config.vocab_size, (48,), generator=generator)

    async def session(peer: str, prompt, reuse: int, batch: int = 1):
        queue, replies = server.stream(peer)
        header = OpenSession(model="m", start_block=0, end_block=2, max_length=64, batch_size=batch, reuse_tokens=reuse)
        queue.put_nowait(pack(header, [prompt] if prompt is not None else [], request=True))
        opened = read_header(await asyncio.wait_for(anext(replies), 60), SessionOpened)
        queue.put_nowait(pack(Step(position=opened.cached_tokens), [hidden[:, opened.cached_tokens :]], request=True))
        reply = await asyncio.wait_for(anext(replies), 60)
        read_header(reply, StepDone)
        queue.put_nowait(None)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(replies), 60)
        return opened.cached_tokens, read_tensors(reply, max_count=1)[0]

    try:
        want = span.forward(hidden, span.new_cache())
        cached, output = await session("client", ids[:40], 0)
        assert cached == 0
        assert server.handler.budget.prefixes.tokens == 32  # two whole blocks of the 40-token prompt
        cached, output = await session("client", ids, 48)
        assert cached == 32
        torch.testing.assert_close(output, want[:, 32:], atol=1e-5, rtol=0)
        cached, _ = await session("another-client", ids, 48)
        assert cached == 0
        cached, _ = await session("client", torch.cat([ids[:20] + 1, ids[20:]]), 48)
        assert cached == 0  # another first block: nothing after it matches either

        for prompt, reuse, batch, message in [
            (ids.float(), 0, 1, "must be int64"),
            (ids[None], 0, 1, "must be int64 of shape"),
            (torch.full((4,), span.config.vocab_size), 0, 1, "must be in"),
            (ids[:8], 16, 1, "exceeds the 8 prompt tokens"),
            (None, 16, 1, "needs the prompt"),
            (ids[:8], 0, 2, "batch of one"),
        ]:
            with pytest.raises(WireError, match=message) as error:
                await session("client", prompt, reuse, batch=batch)
            assert error.value.kind == ErrorKind.BAD_REQUEST
    finally:
        server.close()


async def test_the_steps_of_a_round_push_their_outputs_on_before_any_builds_its_reply(llama_path):
    """The next server's round waits for all of this round's pushes; the client's replies from this span
    are not waited for, so they come after every push of the round has been written."""
    server = InProcessServer(llama_path)
    size = server.span.config.hidden_size
    events: list[tuple[str, str]] = []

    class RecordingPush:
        """Like a `PushStream`: messages queued by `send`, written by a task of its own."""

        def __init__(self, hop, failed):
            self.queue: asyncio.Queue = asyncio.Queue()
            self.writer = asyncio.create_task(self.write())

        def send(self, message) -> None:
            self.queue.put_nowait(message)

        def close(self) -> None:
            self.queue.put_nowait(None)

        async def write(self) -> None:
            while (message := await self.queue.get()) is not None:
                events.append(("push", read_header(message, Push).session_id))

    server.handler.push = RecordingPush
    keys = [uuid.uuid4().hex for _ in range(3)]
    streams = [server.stream(f"client-{index}") for index in range(len(keys))]

    async def consume(replies, key: str) -> None:
        async for reply in replies:
            events.append(("reply", key if read_header(reply, StepDone).position > 3 else "prompt"))

    consumers = []
    try:
        for (queue, replies), key in zip(streams, keys):
            queue.put_nowait(
                pack(
                    OpenSession(model="m", start_block=0, end_block=2, max_length=16, batch_size=1, session_id=key),
                    request=True,
                )
            )
            read_header(await anext(replies), SessionOpened)
            consumers.append(asyncio.create_task(consume(replies, key)))
        for queue, _ in streams:  # every session steps once: the next round waits for all of them
            queue.put_nowait(pack(Step(position=0, step_id=1), [torch.randn(1, 3, size)], request=True))
        while len(events) < len(keys):
            await asyncio.sleep(0.01)
        rounds = server.scheduler.rounds
        for key, (queue, _) in zip(keys, streams):
            hop = Hop(peer_id="next-server", session_id=uuid.uuid4().hex, dtype="float32")
            step = Step(position=3, step_id=2, route=(hop,), sealed_route="c2VhbGVk")
            queue.put_nowait(pack(step, [torch.randn(1, 1, size)], request=True))
        async with asyncio.timeout(60):
            while len(events) < 3 * len(keys):
                await asyncio.sleep(0.01)
        assert server.scheduler.rounds == rounds + 1  # the three steps were one round
        later = events[len(keys) :]
        assert [kind for kind, _ in later] == ["push"] * len(keys) + ["reply"] * len(keys)
        assert sorted(key for _, key in later[len(keys) :]) == sorted(keys)
    finally:
        for consumer in consumers:
            consumer.cancel()
        server.close()
