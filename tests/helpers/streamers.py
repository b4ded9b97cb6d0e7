"""Streamers that act at a given token, to inject faults mid-generation."""

from __future__ import annotations

from transformers.generation.streamers import BaseStreamer


class AtToken(BaseStreamer):
    """Calls `action` when the n-th new token has been produced (the prompt is the first put)."""

    def __init__(self, n: int, action):
        self.n, self.action, self.puts = n, action, 0

    def put(self, value):
        self.puts += 1
        if self.puts == self.n + 1:
            self.action()

    def end(self):
        pass
