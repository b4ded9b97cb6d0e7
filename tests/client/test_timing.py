"""TokenClock: TTFT and TPOT of a generation, passed through to another streamer."""

from __future__ import annotations

import torch
from transformers.generation.streamers import BaseStreamer

from client import TokenClock


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


def test_the_clock_times_new_tokens_only_and_passes_every_call_on():
    inner = Recorder()
    clock = TokenClock(inner=inner)
    clock.put(torch.tensor([[1, 2, 3]]))  # the prompt
    assert clock.summary() == "no new tokens"
    for token in (4, 5, 6):
        clock.put(torch.tensor([token]))
    clock.end()
    assert inner.calls == [[[1, 2, 3]], [4], [5], [6], "end"]
    assert len(clock.times) == 3 and clock.time_to_first_token >= 0
    assert clock.time_per_output_token == (clock.times[-1] - clock.times[0]) / 2
    assert clock.summary().startswith("3 tokens: TTFT ")
