"""Load control an owner sets: acceptance rate, concurrency, hourly quota, working hours."""

from __future__ import annotations

import datetime as dt

import pytest

from configs.schema import WorkingHours
from protocol.errors import ErrorKind, WireError
from swarm.load_control import LoadControl, LoadPolicy


def refused(control: LoadControl, open_sessions: int = 0) -> str:
    with pytest.raises(WireError) as info:
        control.admit(open_sessions)
    assert info.value.kind == ErrorKind.BUSY
    return info.value.message


def test_max_concurrent_sessions():
    control = LoadControl(LoadPolicy(max_concurrent_sessions=2))
    control.admit(0)
    control.admit(1)
    assert "2 sessions open, the owner allows 2" in refused(control, 2)


def test_sessions_per_hour_is_a_sliding_window():
    now = [1000.0]
    control = LoadControl(LoadPolicy(max_sessions_per_hour=3), clock=lambda: now[0])
    for _ in range(3):
        control.admit(0)
    assert "3 new sessions per hour" in refused(control)
    now[0] += 3601
    control.admit(0)


def test_acceptance_rate_declines_the_stated_share():
    draws = iter([0.1, 0.5, 0.29, 0.3, 0.99])
    control = LoadControl(LoadPolicy(acceptance_rate=0.3), rng=lambda: next(draws))
    outcomes = []
    for _ in range(5):
        try:
            control.admit(0)
            outcomes.append(True)
        except WireError as e:
            assert "accepts 30% of new sessions" in e.message
            outcomes.append(False)
    assert outcomes == [True, False, True, False, False]


@pytest.mark.parametrize(
    "window, moment, inside",
    [
        ("09:00-18:00", "12:00", True),
        ("09:00-18:00", "18:00", False),
        ("09:00-18:00", "08:59", False),
        ("22:00-06:00", "23:30", True),
        ("22:00-06:00", "05:59", True),
        ("22:00-06:00", "12:00", False),
    ],
)
def test_working_hours(window, moment, inside):
    control = LoadControl(
        LoadPolicy(working_hours=WorkingHours.parse(window)), local_time=lambda: dt.time.fromisoformat(moment)
    )
    assert control.available() is inside
    if inside:
        control.admit(0)
    else:
        assert f"outside this server's working hours ({window})" in refused(control)


@pytest.mark.parametrize("bad", ["9-5", "09:00", "18:00-18:00", "25:00-26:00"])
def test_bad_working_hours_are_rejected(bad):
    with pytest.raises(ValueError):
        WorkingHours.parse(bad)
