"""Chaos: servers are killed, restarted, stopped and resumed at random while four clients generate.
Every generation ends token-identical to transformers or with a typed error; nothing hangs."""

from __future__ import annotations

import pytest

from harness.chaos import run_chaos
from tests.helpers.client_worker import prompt

pytestmark = pytest.mark.slow


def test_generations_under_chaos_are_identical_or_fail_with_a_typed_error(llama_path, llama_ref, tmp_path):
    cases = [
        (ids, llama_ref.generate(ids, max_new_tokens=12, do_sample=False))
        for ids in (prompt(seed) for seed in range(30, 36))
    ]
    report = run_chaos(
        llama_path,
        [(0, 2), (0, 2), (2, 4), (2, 4)],
        cases,
        tmp_path / "swarm",
        duration=20,
        clients=4,
        max_new_tokens=12,
        seed=7,
    )
    print(report.as_dict())
    assert report.wrong == 0 and report.untyped_errors == [] and report.unfinished_clients == 0
    assert report.faults["kill"] + report.faults["stop"] >= 3  # the swarm really was disturbed
    assert report.identical >= 4  # and generations still got through
