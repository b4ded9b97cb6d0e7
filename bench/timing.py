"""Token timing for the benches: when each generated token came out of `generate()`."""

from __future__ import annotations

import time

from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """Times each generated token (the first `put` is the prompt)."""

    def __init__(self, on_token=None):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False
        self._on_token = on_token

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self._on_token is not None:
            self._on_token(len(self.times))

    def end(self) -> None:
        pass

    @property
    def time_per_output_token(self) -> float:
        """Seconds per token after the first (vLLM's TPOT): what each further token costs, without the
        session's opening and the prompt's prefill, which a generation pays once."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)
