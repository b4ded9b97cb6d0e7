"""Token timing, as vLLM reports it: time to first token (TTFT) and time per output token (TPOT)."""

from __future__ import annotations

import time
from typing import Callable, Optional

from transformers.generation.streamers import BaseStreamer


class TokenClock(BaseStreamer):
    """A streamer that times each generated token from its creation (the first `put` is the prompt);
    with `inner`, it passes every call on to that streamer too (a `TextStreamer`, say)."""

    def __init__(self, on_token: Optional[Callable[[int], None]] = None, inner: Optional[BaseStreamer] = None):
        self.started = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False
        self._on_token = on_token
        self._inner = inner

    def put(self, value) -> None:
        if self._inner is not None:
            self._inner.put(value)
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())  # one put per new token (of every row of a batch)
        if self._on_token is not None:
            self._on_token(len(self.times))

    def end(self) -> None:
        if self._inner is not None:
            self._inner.end()

    @property
    def time_to_first_token(self) -> float:
        """Seconds from the clock's creation to the first new token: the session's opening and the
        prompt's prefill (vLLM's TTFT)."""
        return self.times[0] - self.started

    @property
    def time_per_output_token(self) -> float:
        """Seconds per token after the first (vLLM's TPOT): what each further token costs, without the
        session's opening and the prompt's prefill, which a generation pays once."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def summary(self) -> str:
        """E.g. `8 tokens: TTFT 0.42 s, TPOT 31 ms (32.3 tokens/s after the first)`."""
        count = len(self.times)
        if count == 0:
            return "no new tokens"
        text = f"{count} token{'s' if count != 1 else ''}: TTFT {self.time_to_first_token:.2f} s"
        if count > 1:
            tpot = self.time_per_output_token
            text += f", TPOT {tpot * 1000:.0f} ms ({1 / tpot:.1f} tokens/s after the first)" if tpot > 0 else ""
        return text
