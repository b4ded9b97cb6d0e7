"""Reliability score of a worker in [0, 1] (spec R5): 40 % task success, 30 % uptime stability,
20 % latency, 10 % long-term history, all from what the relay observed itself; plus what API-key
holders reported, each key's reports together moving the score by at most MAX_KEY_EFFECT, whatever
and however often it sends; times FAULT_FACTOR for every fault proven against it (wrong results,
re-checked by the relay: far worse than a timeout). Pure functions of counters the relay keeps.

Every component has a neutral prior (0.5) so a new worker is neither trusted nor shunned, and
moves away from it as evidence accumulates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

WEIGHTS = {"success": 0.4, "stability": 0.3, "latency": 0.2, "history": 0.1}
TARGET_SESSION_SECONDS = 3600.0  # an hour online without a drop counts as fully stable
REFERENCE_LATENCY_MS = 200.0  # a step this slow scores 0.5
HISTORY_WEIGHT_PER_UPDATE = 0.05
REPORT_STEP = 0.01  # how far one report moves a score (before its key's cap)
MAX_KEY_EFFECT = 0.1  # the most one API key's reports move a worker's score, up or down
FAULT_FACTOR = 0.1  # each proven wrong result divides the score by ten


@dataclass(frozen=True)
class WorkerStats:
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    reported: float = 0.0  # the sum over API keys of `key_effect` of each key's reports
    online_seconds: float = 0.0  # summed over the worker's online periods
    online_periods: int = 0  # periods that ended or are running
    unexpected_drops: int = 0  # periods that ended without a graceful offline
    latency_ms: Optional[float] = None  # recent median step or heartbeat latency
    history: float = 0.5  # slow moving average of past scores
    proven_faults: int = 0  # wrong results proven against it (relay.evidence)


def success_rate(stats: WorkerStats) -> float:
    """Share of the tasks the relay saw succeed, with one imaginary success and failure (Laplace) as the prior."""
    return (stats.tasks_succeeded + 1) / (stats.tasks_succeeded + stats.tasks_failed + 2)


def report_value(success: bool, latency_ms: Optional[float] = None) -> float:
    """One report's worth in [-1, 1]: a failure -1, a success +1, or with its latency 2 × its latency
    score - 1 (+1 at 0 ms, 0 at REFERENCE_LATENCY_MS, towards -1 when far slower)."""
    if not success:
        return -1.0
    if latency_ms is None:
        return 1.0
    return 2.0 / (1.0 + max(latency_ms, 0.0) / REFERENCE_LATENCY_MS) - 1.0


def key_effect(values: float) -> float:
    """How far one key's reports (their `report_value`s summed) move a score: REPORT_STEP each, and
    never more than MAX_KEY_EFFECT either way."""
    return min(max(REPORT_STEP * values, -MAX_KEY_EFFECT), MAX_KEY_EFFECT)


def stability(stats: WorkerStats) -> float:
    """Long online periods and few unexpected drops."""
    if stats.online_periods == 0:
        return 0.5
    mean_period = stats.online_seconds / stats.online_periods
    length = min(mean_period / TARGET_SESSION_SECONDS, 1.0)
    clean = 1.0 - stats.unexpected_drops / stats.online_periods
    return 0.5 * length + 0.5 * max(clean, 0.0)


def latency_score(stats: WorkerStats) -> float:
    if stats.latency_ms is None:
        return 0.5
    return 1.0 / (1.0 + max(stats.latency_ms, 0.0) / REFERENCE_LATENCY_MS)


def reliability_score(stats: WorkerStats) -> float:
    score = (
        WEIGHTS["success"] * success_rate(stats)
        + WEIGHTS["stability"] * stability(stats)
        + WEIGHTS["latency"] * latency_score(stats)
        + WEIGHTS["history"] * min(max(stats.history, 0.0), 1.0)
        + stats.reported
    ) * FAULT_FACTOR**stats.proven_faults
    return round(min(max(score, 0.0), 1.0), 6)


def updated_history(history: float, score: float) -> float:
    """The long-term component after one more observation of `score`."""
    return (1 - HISTORY_WEIGHT_PER_UPDATE) * history + HISTORY_WEIGHT_PER_UPDATE * score
