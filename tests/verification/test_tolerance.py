"""The comparison of a claim with a recomputation: the worst position, padding ignored, per-dtype tolerance."""

from __future__ import annotations

import pytest
import torch

from verification.tolerance import TOLERANCE, discrepancy, tolerance


def test_discrepancy_is_the_worst_position_and_ignores_padding():
    reference = torch.ones(2, 3, 4)
    claimed = reference.clone()
    claimed[1, 2, 0] += 0.5  # one position off by 25 % of its norm (2)
    assert discrepancy(claimed, reference) == pytest.approx(0.25)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert discrepancy(claimed, reference, mask) == 0.0
    assert tolerance(torch.float32, torch.float32, 4) == TOLERANCE[torch.float32]
    assert tolerance(torch.float32, torch.bfloat16, 4) == TOLERANCE[torch.bfloat16]
    assert tolerance(torch.bfloat16, torch.bfloat16, 120) == pytest.approx(2 * TOLERANCE[torch.bfloat16])
