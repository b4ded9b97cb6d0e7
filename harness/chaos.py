"""Chaos for a local swarm: while clients generate in a loop, a driver SIGKILLs servers (and starts
replacements), SIGSTOPs them (and SIGCONTs them later), at random. It counts what the clients saw:
every generation must end token-identical to the reference or raise a typed `SwarmError` within its
deadline — never a hang, never a wrong token. Used by `bench/chaos.py` and the chaos test."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from harness.local_swarm import LocalSwarm
from harness.processes import Child

logger = logging.getLogger(__name__)

RESTART_GRACE = 5.0  # seconds a range is left alone after a kill, while its replacement starts
RETRY_PAUSE = 0.5  # a client that got an error waits this long before its next generation, as a user would


@dataclass
class ChaosReport:
    sessions: int = 0  # generations started
    identical: int = 0  # ... that returned the reference tokens
    wrong: int = 0  # ... that returned other tokens (must stay 0)
    typed_errors: Counter = field(default_factory=Counter)  # SwarmError subclasses, by name
    untyped_errors: list[str] = field(default_factory=list)  # anything else (must stay empty)
    longest_generation_s: float = 0.0
    unfinished_clients: int = 0  # client loops still running after the deadline (a hang; must stay 0)
    faults: Counter = field(default_factory=Counter)  # kill / stop / restart / cont

    def as_dict(self) -> dict:
        return {
            "sessions": self.sessions,
            "identical": self.identical,
            "wrong": self.wrong,
            "typed_errors": dict(self.typed_errors),
            "untyped_errors": self.untyped_errors,
            "longest_generation_s": round(self.longest_generation_s, 2),
            "unfinished_clients": self.unfinished_clients,
            "faults": dict(self.faults),
        }


class _Faults:
    """At most one faulty server per block range at a time, so the swarm can always recover."""

    def __init__(
        self, swarm: LocalSwarm, ranges: dict[Child, tuple[int, int]], rng: random.Random, report: ChaosReport
    ):
        self.swarm, self.ranges, self.rng, self.report = swarm, ranges, rng, report
        self.stopped: dict[Child, float] = {}  # SIGSTOPped server -> when to SIGCONT it
        self.busy_until: dict[tuple[int, int], float] = {}  # a range with a fault in progress

    def step(self, now: float) -> None:
        for child, until in list(self.stopped.items()):
            if now >= until:
                child.signal(signal.SIGCONT)
                del self.stopped[child]
                self.report.faults["cont"] += 1
        candidates = [
            child
            for child, span in self.ranges.items()
            if child.proc.poll() is None and child not in self.stopped and self.busy_until.get(span, 0) <= now
        ]
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        span = self.ranges[victim]
        if self.rng.random() < 0.5:
            victim.kill()
            self.report.faults["kill"] += 1
            replacement = self.swarm.add_server(*span, wait=False)
            self.ranges[replacement] = span
            self.busy_until[span] = now + RESTART_GRACE
            self.report.faults["restart"] += 1
        else:
            victim.signal(signal.SIGSTOP)
            self.stopped[victim] = now + self.rng.uniform(1.0, 4.0)
            self.busy_until[span] = self.stopped[victim]
            self.report.faults["stop"] += 1

    def release(self) -> None:
        for child in self.stopped:
            child.signal(signal.SIGCONT)
        self.stopped.clear()


def run_chaos(
    path: str | Path,
    splits: Sequence[tuple[int, int]],
    cases: Sequence[tuple[torch.Tensor, torch.Tensor]],
    workdir: Path,
    duration: float = 20.0,
    clients: int = 4,
    max_new_tokens: int = 12,
    fault_period: tuple[float, float] = (1.0, 3.0),
    request_timeout: float = 5.0,
    step_timeout: float = 60.0,
    seed: int = 0,
) -> ChaosReport:
    """Runs `clients` generation loops over `cases` (prompt ids, expected greedy output) for `duration`
    seconds against a local swarm of `splits`, with faults every `fault_period` seconds."""
    from client import AutoDistributedModelForCausalLM, SwarmError

    report = ChaosReport()
    lock = threading.Lock()
    stop = threading.Event()
    rng = random.Random(seed)
    with LocalSwarm(path, splits, server_args=["--throughput", "100"], workdir=workdir) as swarm:
        ranges = dict(zip(swarm.servers, splits))
        models = [
            AutoDistributedModelForCausalLM.from_pretrained(
                path, swarm.initial_peers, request_timeout=request_timeout, step_timeout=step_timeout, ban_seconds=2
            )
            for _ in range(clients)
        ]

        def client(model, client_rng: random.Random) -> None:
            while not stop.is_set():
                ids, expected = client_rng.choice(cases)
                started = time.monotonic()
                outcome = None
                try:
                    output = model.generate(ids, max_new_tokens=max_new_tokens)
                    outcome = "identical" if torch.equal(output, expected) else "wrong"
                except SwarmError as e:
                    outcome = type(e).__name__
                except Exception as e:  # a bug: counted, and the loop goes on so the run ends normally
                    outcome = f"untyped {type(e).__name__}: {e}"
                elapsed = time.monotonic() - started
                with lock:
                    report.sessions += 1
                    report.longest_generation_s = max(report.longest_generation_s, elapsed)
                    if outcome == "identical":
                        report.identical += 1
                    elif outcome == "wrong":
                        report.wrong += 1
                        logger.error("wrong tokens for prompt %s", ids.tolist())
                    elif outcome.startswith("untyped "):
                        report.untyped_errors.append(outcome.removeprefix("untyped "))
                    else:
                        report.typed_errors[outcome] += 1
                if outcome != "identical":
                    stop.wait(RETRY_PAUSE)

        threads = [
            threading.Thread(target=client, args=(model, random.Random(seed + 1 + i)), daemon=True)
            for i, model in enumerate(models)
        ]
        for thread in threads:
            thread.start()
        faults = _Faults(swarm, ranges, rng, report)
        deadline = time.monotonic() + duration
        try:
            while time.monotonic() < deadline:
                time.sleep(min(rng.uniform(*fault_period), max(0.0, deadline - time.monotonic())))
                faults.step(time.monotonic())
        finally:
            stop.set()
            faults.release()
            # A generation ends within step_timeout per step; past that bound a client is hung.
            bound = time.monotonic() + step_timeout * (max_new_tokens + 1) + 30
            for thread in threads:
                thread.join(max(0.0, bound - time.monotonic()))
            report.unfinished_clients = sum(thread.is_alive() for thread in threads)
            for model in models:
                model.shutdown()
    return report
