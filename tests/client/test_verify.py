"""The spot checker's verdicts: whoever disagrees with the referee is convicted."""

from __future__ import annotations

import torch

from client.verify import SpotChecker
from tests.helpers.claims import claim
from verification.evidence import Recomputation


def _checker(verifier_outputs, referee_outputs):
    async def recompute(claim, avoid):
        assert "A" in avoid
        if "B" in avoid:  # the second opinion must come from someone else
            return (
                None
                if referee_outputs is None
                else Recomputation("C", frozenset({"C"}), referee_outputs, torch.float32)
            )
        return Recomputation("B", frozenset({"B"}), verifier_outputs, torch.float32)

    return SpotChecker(1.0, recompute, referee=None)


async def test_a_verdict_convicts_whoever_disagrees_with_the_referee():
    inputs = torch.randn(1, 6, 8)
    truth = torch.randn(1, 6, 8)
    wrong = truth + 0.1 * torch.randn(1, 6, 8)
    # Agreement: verified, nobody accused, no referee asked.
    verdict = await _checker(truth.clone(), None).check(claim(truth, inputs))
    assert verdict.verified and not verdict.wrong
    # The claim is wrong: the referee sides with the verifier.
    verdict = await _checker(truth, truth).check(claim(wrong, inputs))
    assert not verdict.verified and [e.peer_id for e in verdict.wrong] == ["A"]
    evidence = verdict.wrong[0]
    assert evidence.referee == "C" and evidence.claimed_error > evidence.tolerance and evidence.verifier_error == 0
    assert len(evidence.input_digest) == 64 and evidence.claimed_digest != evidence.referee_digest
    # The verifier is wrong: the claim stands, the verifier is accused.
    verdict = await _checker(wrong, truth).check(claim(truth, inputs))
    assert verdict.verified and [e.peer_id for e in verdict.wrong] == ["B"]
    # Nobody to settle it: neither is judged.
    verdict = await _checker(wrong, None).check(claim(truth, inputs))
    assert not verdict.verified and not verdict.wrong
    # Only positions since the last check are judged (earlier ones were verified already).
    early_wrong = truth.clone()
    early_wrong[:, :3] += 1.0
    verdict = await _checker(truth, truth).check(claim(early_wrong, inputs, verified=3))
    assert verdict.verified and not verdict.wrong
