"""Block choice and rebalancing are pure functions of the swarm's records."""

from __future__ import annotations

import pytest

from swarm.selection import choose_start, coverage, rebalance_target
from tests.helpers.records import servers


def test_coverage_counts_joining_and_online_servers_only():
    blocks = servers(
        ("a", 0, 4, "online", 100, 10.0),
        ("b", 2, 6, "joining", 100, 0.0),
        ("c", 4, 8, "draining", 100, 5.0),
        ("d", 6, 8, "offline"),
    )
    assert coverage(blocks) == [10, 10, 11, 11, 1, 1, 0, 0]
    assert coverage(blocks, exclude_peer="a") == [0, 0, 1, 1, 1, 1, 0, 0]


def test_new_servers_fill_the_weakest_window_first():
    assert choose_start([0.0] * 8, 3) == 0
    assert choose_start([5, 5, 5, 0, 0, 0, 0, 5], 3) == 3
    assert choose_start([5, 5, 5, 5, 5, 1, 2, 0], 2) == 6  # the uncovered block is the weakest
    # Servers joining one after another cover a model exactly, whatever their order.
    cover = [0.0] * 6
    for _ in range(3):
        start = choose_start(cover, 2)
        cover = [c + (10 if start <= i < start + 2 else 0) for i, c in enumerate(cover)]
    assert cover == [10.0] * 6
    with pytest.raises(ValueError):
        choose_start([0.0] * 4, 5)


def test_rebalance_moves_only_when_it_helps_enough():
    # Blocks 4-5 lost their servers; this server at 0:2 shares its blocks with another one.
    assert rebalance_target([10, 10, 10, 10, 0, 0], 0, 2, 10, threshold=0.2) == 4
    # Nobody else serves 0:2: leaving would open a hole, not fill one.
    assert rebalance_target([0, 0, 10, 10, 0, 0], 0, 2, 10, threshold=0.2) is None
    # A small gain stays below the hysteresis threshold.
    assert rebalance_target([10, 10, 10, 10, 9, 9], 0, 2, 1, threshold=0.2) is None
    assert rebalance_target([10, 10, 10, 10, 5, 5], 0, 2, 10, threshold=0.2) == 4
    assert rebalance_target([10, 10, 10, 10, 10, 10], 0, 2, 10, threshold=0.2) is None


def test_throughput_is_measured_once_and_scaled_to_the_span(tmp_path):
    from blocks.checkpoint import Checkpoint
    from blocks.loading import load_span
    from blocks.synthetic import make_random_checkpoint
    from swarm.throughput import cached_throughput

    checkpoint = Checkpoint(make_random_checkpoint(tmp_path / "m", "llama", num_layers=4))
    two, four = load_span(checkpoint, 0, 2), load_span(checkpoint, 0, 4)
    first = cached_throughput(two, "m", "cpu", "1.0", tmp_path / "cache")
    assert first.inference > 0 and first.forward > 0
    (cached,) = (tmp_path / "cache" / "throughput").glob("*.json")
    assert cached_throughput(two, "m", "cpu", "1.0", tmp_path / "cache") == first  # read back, not remeasured
    assert cached_throughput(four, "m", "cpu", "1.0", tmp_path / "cache").inference == pytest.approx(
        first.inference / 2
    )
    cached_throughput(two, "m", "cpu", "2.0", tmp_path / "cache")  # a new version measures again
    assert len(list((tmp_path / "cache" / "throughput").glob("*.json"))) == 2
