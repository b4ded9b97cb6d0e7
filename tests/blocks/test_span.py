"""A span computes a packed batch of sessions exactly as it computes each session alone."""

from __future__ import annotations

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_span
from blocks.span import SpanInput
from tests.helpers.models import ATOL


def solo(span, hiddens, masks):
    """Each step of one sequence run alone through the span with the growing cache of transformers' kind."""
    cache = span.new_cache()
    return [span.forward(hidden, cache, mask) for hidden, mask in zip(hiddens, masks)]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_packed_batch_of_sessions_matches_each_session_alone(request, name):
    """Sessions at different positions, with different batch sizes, prompt lengths and left padding,
    joining and leaving between rounds, computed as one batch per round."""
    path = request.getfixturevalue(f"{name}_path")
    span = load_span(Checkpoint(path), 0, 3, torch.float32, "cpu")
    pool = span.new_pool(4096)
    size = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    # (batch, prompt tokens, left padding of the first row, round it joins in, decode steps)
    plans = [(1, 7, 0, 0, 6), (2, 3, 2, 0, 4), (3, 12, 5, 1, 5), (1, 1, 0, 2, 3), (2, 9, 0, 3, 2)]
    sessions = []
    for batch, prompt, padding, joins, steps in plans:
        hiddens = [torch.randn(batch, prompt, size, generator=generator)]
        hiddens += [torch.randn(batch, 1, size, generator=generator) for _ in range(steps)]
        mask = torch.ones(batch, prompt + steps, dtype=torch.int64)
        mask[0, :padding] = 0
        masks = [mask[:, : prompt + i] if padding else None for i in range(steps + 1)]
        sessions.append(
            {"hiddens": hiddens, "masks": masks, "joins": joins, "cache": pool.allocate(batch, 64), "outputs": []}
        )
    expected = [solo(span, s["hiddens"], s["masks"]) for s in sessions]

    for round_index in range(12):
        active = [s for s in sessions if s["joins"] <= round_index and len(s["outputs"]) < len(s["hiddens"])]
        if not active:
            break
        inputs = [SpanInput(s["hiddens"][len(s["outputs"])], s["cache"], s["masks"][len(s["outputs"])]) for s in active]
        for s, output in zip(active, span.forward_batch(inputs)):
            s["outputs"].append(output)
        for s in sessions:  # a session that is done leaves, and its slots go back to the pool
            if len(s["outputs"]) == len(s["hiddens"]) and s["cache"] is not None:
                s["cache"].release()
                s["cache"] = None
    for s, want in zip(sessions, expected):
        assert len(s["outputs"]) == len(want)
        for got, ref in zip(s["outputs"], want):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert pool.largest_free_run() == 4096
