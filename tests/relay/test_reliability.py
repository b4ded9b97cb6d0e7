"""The relay's reliability scores and their weights."""

from __future__ import annotations

import pytest

from relay.reliability import WorkerStats, reliability_score, success_rate, updated_history


def test_new_worker_scores_neutral_and_weights_add_up():
    assert reliability_score(WorkerStats()) == pytest.approx(0.5)
    perfect = WorkerStats(
        tasks_succeeded=10_000, online_seconds=10 * 3600, online_periods=10, latency_ms=0, history=1.0
    )
    assert reliability_score(perfect) == pytest.approx(1.0, abs=1e-3)
    awful = WorkerStats(
        tasks_failed=10_000, online_seconds=10, online_periods=10, unexpected_drops=10, latency_ms=1e9, history=0.0
    )
    assert reliability_score(awful) == pytest.approx(0.0, abs=1e-3)


def test_each_component_has_its_weight():
    base = WorkerStats(online_seconds=3600, online_periods=1, latency_ms=200, history=0.5)
    # success 0.5 → 1.0 moves the score by 0.4 × 0.5
    assert reliability_score(WorkerStats(**{**base.__dict__, "tasks_succeeded": 10**6})) - reliability_score(
        base
    ) == pytest.approx(0.2, abs=1e-3)
    # one unexpected drop in one period: stability 1.0 → 0.5, i.e. −0.3 × 0.5
    dropped = WorkerStats(**{**base.__dict__, "unexpected_drops": 1})
    assert reliability_score(base) - reliability_score(dropped) == pytest.approx(0.15)
    # latency 200 ms scores 0.5; 0 ms scores 1.0: +0.2 × 0.5
    fast = WorkerStats(**{**base.__dict__, "latency_ms": 0})
    assert reliability_score(fast) - reliability_score(base) == pytest.approx(0.1)
    assert reliability_score(WorkerStats(**{**base.__dict__, "history": 1.0})) - reliability_score(
        base
    ) == pytest.approx(0.05)
    assert updated_history(0.5, 1.0) == pytest.approx(0.525)


def test_a_reported_outcome_weighs_a_quarter_of_one_the_relay_saw():
    seen = WorkerStats(tasks_failed=3)
    reported = WorkerStats(reports_failed=12)
    assert success_rate(seen) == pytest.approx(success_rate(reported)) == pytest.approx(1 / 5)
    assert success_rate(WorkerStats(reports_failed=3)) > success_rate(seen)
