"""protocol.pacing: until when a batch waits for the steps of sessions stepping now."""

from __future__ import annotations

from pytest import approx

from protocol.pacing import DUE_SLACK, Arrivals


def stepping(*steps: tuple[str, float]) -> Arrivals:
    arrivals = Arrivals(active_batches=3)
    for key, at in steps:
        arrivals.arrived(key, at)
    return arrivals


def test_before_any_round_trip_is_known_a_batch_waits_only_the_short_while():
    arrivals = stepping(("a", 0.0), ("b", 0.01))
    assert arrivals.deadline(0.01, ["b"], unknown_wait=0.02, longest_wait=1.0) == approx(0.01 + 0.02)


def test_a_batch_waits_for_a_step_due_within_half_the_queued_round_trip_and_not_for_a_later_one():
    # a: every 0.4 s, queued now (t = 0.8), waits at most 0.2 s; b: every 0.4 s, last at 0.45, due at
    # 0.85 and waited for a little longer; with its last step at 0.55, until a's patience runs out.
    arrivals = stepping(("a", 0.4), ("b", 0.05), ("a", 0.8), ("b", 0.45))
    assert arrivals.deadline(0.8, ["a"], unknown_wait=0.02, longest_wait=1.0) == approx(0.45 + 0.4 * DUE_SLACK)
    arrivals = stepping(("a", 0.4), ("b", 0.15), ("a", 0.8), ("b", 0.55))
    assert arrivals.deadline(0.8, ["a"], unknown_wait=0.02, longest_wait=1.0) == approx(0.8 + 0.2)
    # c steps every 2 s: due 1.2 s from now, far beyond a's patience (0.2 s): not waited for.
    arrivals = stepping(("a", 0.4), ("c", -1.2), ("a", 0.8), ("c", 0.8))
    assert arrivals.deadline(0.8, ["a"], unknown_wait=0.02, longest_wait=1.0) == approx(0.8 + 0.02)
    # and never longer than longest_wait
    arrivals = stepping(("a", 0.4), ("b", 0.05), ("a", 0.8), ("b", 0.45))
    assert arrivals.deadline(0.8, ["a"], unknown_wait=0.0, longest_wait=0.1) == approx(0.8 + 0.1)


def test_sessions_that_left_or_stopped_stepping_are_not_counted():
    arrivals = stepping(("a", 0.0), ("b", 0.0), ("c", 0.0))
    arrivals.left("c")
    assert arrivals.active() == 2
    for _ in range(3):
        arrivals.batch_ran()
    arrivals.arrived("a", 1.0)
    assert arrivals.active() == 2  # b's last step came 3 batches ago: still stepping
    arrivals.batch_ran()
    assert arrivals.active() == 1
