"""The step scheduler batches concurrent steps and chunks a long prompt between decoders."""

from __future__ import annotations

import asyncio

import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from swarm.batching import StepScheduler
from swarm.compute import ComputeThread
from tests.helpers.models import ATOL


async def test_the_scheduler_batches_concurrent_steps_and_chunks_a_long_prompt_between_decoders(llama_path):
    span = load_span(Checkpoint(llama_path), 0, 4, torch.float32, "cpu")
    pool = span.new_pool(1024)
    size = span.config.hidden_size
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=8)
    generator = torch.Generator().manual_seed(1)
    try:
        # Six decoders with a little history each, and one 20-token prompt: 3 chunks of at most 8 tokens.
        decoders = []
        for _ in range(6):
            cache = pool.allocate(1, 32)
            history = torch.randn(1, 4, size, generator=generator)
            await scheduler.run(span, history, cache, None, 0, 4)
            step = torch.randn(1, 1, size, generator=generator)
            reference_cache = span.new_cache()
            span.forward(history, reference_cache)
            decoders.append((cache, step, span.forward(step, reference_cache)))
        prompt = torch.randn(1, 20, size, generator=generator)
        prompt_cache = pool.allocate(1, 32)
        rounds_before = scheduler.rounds
        finished: list[str] = []

        async def decode(index, cache, step):
            output = await scheduler.run(span, step, cache, None, 0, 4)
            finished.append(f"decoder {index}")
            return output

        async def prefill():
            output = await scheduler.run(span, prompt, prompt_cache, None, 0, 4)
            finished.append("prompt")
            return output

        results = await asyncio.wait_for(
            asyncio.gather(prefill(), *(decode(i, cache, step) for i, (cache, step, _) in enumerate(decoders))),
            timeout=60,
        )
        torch.testing.assert_close(results[0], span.forward(prompt, span.new_cache()), atol=ATOL, rtol=0)
        for output, (_, _, want) in zip(results[1:], decoders):
            torch.testing.assert_close(output, want, atol=ATOL, rtol=0)
        # 7 steps (26 tokens) in 4 rounds at most: the decoders rode along with the prompt's chunks,
        # and every decoder was done before the prompt's last chunk.
        assert scheduler.rounds - rounds_before <= 4
        assert finished[-1] == "prompt"
        assert prompt_cache.length(0) == 20

        # A step whose cache is gone fails alone; the others in its round still get their answers.
        broken = pool.allocate(1, 32)
        broken.release()
        good_cache = pool.allocate(1, 32)
        step = torch.randn(1, 3, size, generator=generator)
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                scheduler.run(span, step, broken, None, 0, 4),
                scheduler.run(span, step, good_cache, None, 0, 4),
                return_exceptions=True,
            ),
            timeout=60,
        )
        assert isinstance(outcomes[0], RuntimeError) and "given back" in str(outcomes[0])
        torch.testing.assert_close(outcomes[1], span.forward(step, span.new_cache()), atol=ATOL, rtol=0)
    finally:
        scheduler.close()
        compute.shutdown()


async def test_a_round_waits_briefly_for_the_step_of_a_session_that_is_stepping_now(monkeypatch):
    """Two sessions step in turn; the second one's step comes a moment after the first one's: the
    round waits for it (at most as long as the last round took) and computes both at once."""
    import time

    from swarm import batching

    monkeypatch.setattr(batching, "GATHER_MAX_SECONDS", 5.0)
    sizes: list[int] = []

    def slow_round(chosen):
        sizes.append(len(chosen))
        time.sleep(0.3)
        return [step.hidden for step, _ in chosen]

    monkeypatch.setattr(batching, "_run_round", slow_round)
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=64)
    first, second = object(), object()  # the two sessions' caches
    hidden = torch.zeros(1, 1, 4)

    async def step(cache, after: float = 0.0):
        await asyncio.sleep(after)
        return await scheduler.run(None, hidden, cache, None, 0, 1)

    try:
        await asyncio.wait_for(asyncio.gather(step(first), step(second)), 60)  # both are stepping now
        await asyncio.wait_for(asyncio.gather(step(first), step(second, after=0.05)), 60)
        assert sizes[-1] == 2, sizes
    finally:
        scheduler.close()
        compute.shutdown()


async def test_a_closed_session_is_not_waited_for(llama_path):
    span = load_span(Checkpoint(llama_path), 0, 4, torch.float32, "cpu")
    pool = span.new_pool(64)
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=64)
    caches = [pool.allocate(1, 8), pool.allocate(1, 8)]
    hidden = torch.randn(1, 1, span.config.hidden_size, generator=torch.Generator().manual_seed(3))
    try:
        for cache in caches:
            await asyncio.wait_for(scheduler.run(span, hidden, cache, None, 0, 4), 60)
        assert scheduler.stepping == 2
        scheduler.left(caches[0])  # what the handler does when a session ends
        assert scheduler.stepping == 1
    finally:
        scheduler.close()
        compute.shutdown()


async def test_background_work_waits_for_a_round_of_the_sessions_stepping_and_only_then(monkeypatch):
    """An import reads its next chunk after a round of the sessions decoding here; with none
    stepping, it does not wait at all."""
    import time

    from swarm import batching

    rounds: list[float] = []

    def slow_round(chosen):
        time.sleep(0.3)
        rounds.append(time.monotonic())
        return [step.hidden for step, _ in chosen]

    monkeypatch.setattr(batching, "_run_round", slow_round)
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=64)
    try:
        await asyncio.wait_for(scheduler.after_round(timeout=3600), 60)  # nobody steps: no wait at all
        assert rounds == []
        hidden = torch.zeros(1, 1, 4)
        await scheduler.run(None, hidden, "a session", None, 0, 1)  # it steps now
        step = asyncio.ensure_future(scheduler.run(None, hidden, "a session", None, 0, 1))
        await asyncio.sleep(0)  # its round has started
        await asyncio.wait_for(scheduler.after_round(timeout=30), 60)
        assert len(rounds) == 2 and step.done()
    finally:
        scheduler.close()
        compute.shutdown()
