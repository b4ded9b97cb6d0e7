"""A server that moves to other blocks frees the old ones first and ends the sessions left on them clearly."""

from __future__ import annotations

import asyncio
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from protocol.errors import ErrorKind, WireError
from protocol.messages import OpenSession, SessionOpened, Step, StepDone, pack, read_header
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
