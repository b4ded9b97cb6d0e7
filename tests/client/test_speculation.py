"""Speculation's parts: drafts from the context, the greedy and sampled acceptance rules, the draft size."""

from __future__ import annotations

import torch

from client.speculation import DraftSize, PromptLookup, verify_greedy, verify_sampled

SAMPLES = 4000
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, significance 0.001


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_prompt_lookup_drafts_what_followed_the_latest_match_of_the_last_ngram():
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6]])
    assert PromptLookup(2).draft(ids, 3, False).tokens.tolist() == [1, 2, 5]
    assert PromptLookup(2).draft(torch.tensor([[1, 2, 3, 4]]), 3, False).tokens.numel() == 0
    assert PromptLookup(1).draft(torch.tensor([[4, 9, 9, 4]]), 2, False).tokens.tolist() == [9, 9]


def test_greedy_keeps_the_matching_prefix_and_the_models_next_token():
    scores = [torch.eye(6)[t] for t in (2, 3, 4, 5)]
    assert verify_greedy(torch.tensor([2, 3, 4]), scores) == [2, 3, 4, 5]  # all accepted, plus one
    assert verify_greedy(torch.tensor([2, 0, 4]), scores) == [2, 3]  # the second is rejected
    assert verify_greedy(torch.tensor([], dtype=torch.long), scores[:1]) == [2]


def test_sampling_with_a_deterministic_draft_leaves_the_distribution_unchanged():
    """First token over SAMPLES runs, and the second where the first was the drafted one: each follows
    the model's own distribution (chi-square at significance 0.001, fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    p2 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])
    draft = torch.tensor([3, 1])
    first, second = torch.zeros(6), torch.zeros(6)
    for _ in range(SAMPLES):
        kept = verify_sampled(draft, None, [p1, p2, p2], generator)
        first[kept[0]] += 1
        if kept[0] == 3:
            second[kept[1]] += 1
    assert chi_square(first, p1) < CHI2_DF5_P001
    assert chi_square(second, p2) < CHI2_DF5_P001
    assert second.sum() > SAMPLES * 0.2  # the draft was accepted about p1[3] of the time


def test_sampling_with_a_drafters_distribution_leaves_the_distribution_unchanged():
    generator = torch.Generator().manual_seed(1)
    p = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.1, 0.1])
    q = torch.tensor([0.4, 0.1, 0.1, 0.1, 0.2, 0.1])
    counts = torch.zeros(6)
    for _ in range(SAMPLES):
        token = torch.multinomial(q, 1, generator=generator)
        counts[verify_sampled(token, q[None], [p, p], generator)[0]] += 1
    assert chi_square(counts, p) < CHI2_DF5_P001


def test_the_draft_size_grows_while_drafts_are_accepted_and_shrinks_when_they_are_not():
    size = DraftSize(8)
    size.update(8, 8)
    assert size.size == 8
    size.update(8, 2)
    assert size.size == 3
    size.update(3, 3)
    assert size.size == 5
    size.update(5, 0)
    assert size.size == 1 and size.traversals == 4 and size.accepted == 13
