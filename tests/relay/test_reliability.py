"""The relay's reliability scores and their weights."""

from __future__ import annotations

import time

import pytest

from relay.reliability import (
    MAX_KEY_EFFECT,
    WorkerStats,
    key_effect,
    reliability_score,
    report_value,
    updated_history,
)


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


def test_one_keys_reports_move_a_score_by_a_tenth_at_most_and_many_keys_further():
    assert report_value(False) == -1 and report_value(True) == 1
    assert report_value(True, latency_ms=0) == 1 and report_value(True, latency_ms=200) == pytest.approx(0)
    assert -1 < report_value(True, latency_ms=1e9) < -0.99  # a very slow success is nearly a failure
    assert key_effect(-3) == pytest.approx(-0.03) and key_effect(-1e9) == -MAX_KEY_EFFECT == -0.1
    assert key_effect(1e9) == MAX_KEY_EFFECT
    base = WorkerStats(tasks_succeeded=50, tasks_failed=5, online_seconds=7200, online_periods=2, latency_ms=80)
    one_key = WorkerStats(**{**base.__dict__, "reported": key_effect(-60 * 1)})
    assert reliability_score(base) - reliability_score(one_key) == pytest.approx(0.1)
    five_keys = WorkerStats(**{**base.__dict__, "reported": 5 * key_effect(-60)})
    assert reliability_score(five_keys) == pytest.approx(reliability_score(base) - 0.5)


async def test_whatever_one_key_reports_hour_after_hour_the_score_moves_a_tenth_at_most(tmp_path):
    from cryptography.fernet import Fernet

    from relay.http import HTTPError
    from relay.schemas import RegisterRequest
    from relay.store import Store
    from relay.workers import REPORTS_PER_HOUR, WorkerRegistry
    from tests.helpers.relay_process import signed_registration

    now = [time.time()]
    store = Store(f"sqlite:///{tmp_path / 'relay.db'}")
    await store.open()
    try:
        registry = WorkerRegistry(store, Fernet.generate_key(), heartbeat_timeout=60, clock=lambda: now[0])
        signed = signed_registration("target", "http://127.0.0.1:8000")
        body = RegisterRequest(**signed)
        await registry.register(body, signed, "http://127.0.0.1:8000", "127.0.0.1", None)
        peer = body.peer_id
        before = (await registry.scores())[peer]
        for _hour in range(3):
            for _ in range(REPORTS_PER_HOUR):
                assert await registry.record_report("mallory", peer, False, latency_ms=3_600_000) == 1
            with pytest.raises(HTTPError) as refused:
                await registry.record_report("mallory", peer, False)
            assert refused.value.status == 429
            assert before - (await registry.scores())[peer] == pytest.approx(0.1)
            now[0] += 3601
        # Other keys, each on its own budget, move it further.
        for key in ("k1", "k2"):
            for _ in range(REPORTS_PER_HOUR):
                await registry.record_report(key, peer, False)
        assert before - (await registry.scores())[peer] == pytest.approx(0.3)
    finally:
        await store.close()
