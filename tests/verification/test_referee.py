"""The local referee keeps the blocks it loaded and computes only what a session added since its last check."""

from __future__ import annotations

import torch

from blocks.synthetic import make_random_checkpoint
from tests.helpers.claims import claim
from verification.evidence import Claim
from verification.tolerance import discrepancy


async def test_the_local_referee_keeps_the_blocks_it_loaded(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    import verification.referee
    from blocks.checkpoint import Checkpoint
    from blocks.loading import load_span

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "llama", "llama", num_layers=4, seed=3))
    loads = []

    def counting_load(checkpoint, start, end, *args, **kwargs):
        loads.append((start, end))
        return load_span(checkpoint, start, end, *args, **kwargs)

    monkeypatch.setattr(verification.referee, "load_span", counting_load)
    inputs = torch.randn(1, 5, checkpoint.hidden_size)
    expected = load_span(checkpoint, 1, 3).forward(inputs)
    with ThreadPoolExecutor(1) as executor:
        referee = verification.referee.LocalReferee(checkpoint, executor)
        for verified in (0, 2):
            result = await referee(replace(claim(expected, inputs, verified), start=1, end=3), frozenset())
            assert torch.equal(result.outputs, expected) and result.by == "client"
        assert loads == [(1, 2), (2, 3)]  # each block once, however many checks
        result = await referee(replace(claim(expected, inputs), start=2, end=4), frozenset())
        assert torch.equal(result.outputs, load_span(checkpoint, 2, 4).forward(inputs))
        assert loads == [(1, 2), (2, 3), (3, 4)]
        assert (
            await verification.referee.LocalReferee(checkpoint, executor, memory_fraction=0)(
                claim(expected, inputs), frozenset()
            )
            is None
        )  # no room: no opinion


async def test_the_local_referee_computes_only_what_a_session_added_since_its_last_check(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from blocks.checkpoint import Checkpoint
    from blocks.loading import load_span
    from blocks.span import BlockSpan
    from verification.referee import LocalReferee

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, seed=4))
    span = load_span(checkpoint, 0, 2)
    inputs = torch.randn(2, 9, checkpoint.hidden_size)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0  # left padding
    computed = []
    forward, forward_batch = BlockSpan.forward, BlockSpan.forward_batch

    def counting_forward_batch(self, inputs, *args, **kwargs):
        if self is not span:  # the referee's, not this test's own
            computed.extend(item.hidden.shape[1] for item in inputs)
        return forward_batch(self, inputs, *args, **kwargs)

    monkeypatch.setattr(BlockSpan, "forward_batch", counting_forward_batch)
    with ThreadPoolExecutor(1) as executor:
        referee = LocalReferee(checkpoint, executor)
        for end in (5, 9):  # a session's first check, then a later one
            claim = Claim(
                peer_id="A",
                start=0,
                end=2,
                dtype=torch.float32,
                inputs=inputs[:, :end],
                outputs=inputs[:, :end],
                mask=mask[:, :end],
                verified=0,
                session_id="s",
            )
            result = await referee(claim, frozenset())
            alone = forward(span, inputs[:, :end], attention_mask=mask[:, :end])
            assert discrepancy(result.outputs, alone, mask[:, :end]) < 1e-5
        assert computed[-2:] == [5, 4]
        rewritten = inputs.clone()
        rewritten[:, 6] += 1  # a rollback changed position 6: start over
        result = await referee(replace(claim, inputs=rewritten), frozenset())
        assert computed[-1] == 9
        assert discrepancy(result.outputs, forward(span, rewritten, attention_mask=mask), mask) < 1e-5
        small = LocalReferee(checkpoint, executor, keep_bytes=1)  # room for the newest session's cache only
        computed.clear()
        for session in ("s", "t", "s"):
            await small(replace(claim, session_id=session), frozenset())
        assert computed == [9, 9, 9]  # "s" was let go when "t" came


async def test_claims_that_wait_together_are_computed_in_one_packed_forward(tmp_path, monkeypatch):
    """Sessions' checks that wait while the referee computes go in one forward per span (the weights
    read once), each with its own cache, positions and mask: each result is what it would be alone.
    Two checks of one session's span never share a turn (the second continues from the first)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from blocks.checkpoint import Checkpoint
    from blocks.loading import load_span
    from blocks.span import BlockSpan
    from verification.referee import LocalReferee

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, seed=5))
    span = load_span(checkpoint, 0, 2)
    forward_batch = BlockSpan.forward_batch
    turns = []

    def counting_forward_batch(self, inputs, *args, **kwargs):
        if self is not span:  # the referee's, not this test's own
            turns.append([item.hidden.shape[1] for item in inputs])
        return forward_batch(self, inputs, *args, **kwargs)

    monkeypatch.setattr(BlockSpan, "forward_batch", counting_forward_batch)
    generator = torch.Generator().manual_seed(0)
    claims: list[Claim] = []
    for index, (batch, length) in enumerate([(1, 7), (2, 5), (1, 3)]):
        inputs = torch.randn(batch, length, checkpoint.hidden_size, generator=generator)
        mask = torch.ones(batch, length, dtype=torch.int64)
        if batch == 2:
            mask[1, :2] = 0  # left padding
        claims.append(replace(claim(inputs, inputs), mask=mask, session_id=f"session-{index}"))
    # The first session's next check, longer: it waits for the turn after its first one.
    longer = torch.cat([claims[0].inputs, torch.randn(1, 2, checkpoint.hidden_size, generator=generator)], dim=1)
    again = replace(claims[0], inputs=longer, outputs=longer, mask=torch.ones(1, 9))
    with ThreadPoolExecutor(1) as executor:
        referee = LocalReferee(checkpoint, executor)
        results = await asyncio.gather(*(referee(each, frozenset()) for each in [*claims, again]))
    assert turns == [[7, 5, 3], [2]] and (referee.batches, referee.claims) == (2, 4)
    for each, result in zip([*claims, again], results):
        alone = span.forward(each.inputs, attention_mask=each.mask)
        assert discrepancy(result.outputs, alone, each.mask) < 1e-5


async def test_a_check_nobody_waits_for_any_more_is_not_computed(tmp_path):
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from blocks.checkpoint import Checkpoint
    from verification.referee import LocalReferee

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, seed=6))
    inputs = torch.randn(1, 4, checkpoint.hidden_size)
    release = threading.Event()
    with ThreadPoolExecutor(1) as executor:
        referee = LocalReferee(checkpoint, executor)
        busy = asyncio.get_running_loop().run_in_executor(executor, release.wait, 30)
        first = asyncio.ensure_future(referee(claim(inputs, inputs), frozenset()))
        await asyncio.sleep(0.05)  # its turn waits for the executor
        abandoned = asyncio.ensure_future(referee(claim(inputs, inputs), frozenset()))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        release.set()
        await busy
        assert (await first) is not None
        assert referee.batches == 1  # the abandoned check was dropped before its turn


async def test_a_claim_that_cannot_be_computed_fails_alone_in_a_packed_turn(tmp_path):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from blocks.checkpoint import Checkpoint
    from blocks.loading import load_span
    from verification.referee import LocalReferee

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "llama", "llama", num_layers=2, seed=8))
    good = torch.randn(1, 4, checkpoint.hidden_size)
    bad = torch.randn(1, 4, checkpoint.hidden_size + 1)  # not this model's width
    with ThreadPoolExecutor(1) as executor:
        referee = LocalReferee(checkpoint, executor)
        results = await asyncio.gather(
            referee(replace(claim(good, good), session_id="good"), frozenset()),
            referee(replace(claim(bad, bad), session_id="bad"), frozenset()),
            referee(replace(claim(bad, bad), session_id="bad", start=1), frozenset()),  # alone in its span
            return_exceptions=True,
        )
        assert referee.batches == 1
        assert torch.equal(results[0].outputs, load_span(checkpoint, 0, 2).forward(good))
        assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)
        again = await referee(replace(claim(good, good), session_id="good"), frozenset())  # kept: nothing to add
        assert torch.equal(again.outputs, results[0].outputs)
