"""What the client remembers of finished prompts, so that servers' prefix caches can be reused.

A server that kept a prompt's KV (its prefix cache) can start a new session from it, but the client
must still hold what each span was sent and answered for those positions: a failover replays a
span's inputs to its replacement, and a spot check recomputes a span's outputs from them. So the
client reuses a server's cached prefix only where it remembers that very server's span of it (same
peer, same blocks): then the outputs it holds are the server's own, and what the server reuses is
what it computed from the inputs the client holds. Entries are kept least recently used first,
within a byte budget.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from protocol.messages import PREFIX_BLOCK_TOKENS

logger = logging.getLogger(__name__)

DEFAULT_PREFIX_MEMORY_MBYTES = 256.0


@dataclass(frozen=True)
class RememberedSpan:
    """One server's span of a finished prompt: its inputs and outputs at positions [0, tokens)."""

    peer_id: str
    start: int
    end: int
    inputs: torch.Tensor  # [1, tokens, hidden]
    outputs: Optional[torch.Tensor]  # [1, tokens, hidden], when the session kept them (spot checks)

    @property
    def nbytes(self) -> int:
        tensors = [self.inputs] + ([self.outputs] if self.outputs is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class RememberedPrompt:
    ids: torch.Tensor  # [tokens] int64, a whole number of blocks
    spans: tuple[RememberedSpan, ...]

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * 8 + sum(span.nbytes for span in self.spans)

    def span(self, peer_id: str, start: int, end: int) -> Optional[RememberedSpan]:
        for span in self.spans:
            if (span.peer_id, span.start, span.end) == (peer_id, start, end):
                return span
        return None

    @property
    def chain(self) -> list[tuple[str, int, int]]:
        return [(span.peer_id, span.start, span.end) for span in self.spans]


def common_blocks(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens in whole blocks at the start of `a` and `b` that are the same."""
    length = min(a.shape[0], b.shape[0])
    differ = torch.nonzero(a[:length] != b[:length])
    same = int(differ[0]) if differ.numel() else length
    return same - same % PREFIX_BLOCK_TOKENS


class PrefixMemory:
    """Finished prompts (their ids and every span's inputs and outputs), within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, RememberedPrompt] = OrderedDict()
        self._next = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def lookup(self, ids: torch.Tensor) -> tuple[Optional[RememberedPrompt], int]:
        """The entry sharing the most whole blocks with `ids` ([tokens] int64), and how many tokens of
        it may be reused: never the whole of `ids` (the last token must be computed for its logits)."""
        best, best_tokens = None, 0
        usable = ids.shape[0] - 1
        for key, entry in self._entries.items():
            tokens = min(common_blocks(entry.ids, ids), usable - usable % PREFIX_BLOCK_TOKENS)
            if tokens > best_tokens:
                best, best_tokens, best_key = entry, tokens, key
        if best is not None:
            self._entries.move_to_end(best_key)
        return best, best_tokens

    def remember(self, ids: torch.Tensor, spans: Sequence[RememberedSpan]) -> None:
        """Keeps a finished prompt; an entry whose ids are a prefix of it (the turn before) is dropped."""
        if self.max_bytes <= 0 or not spans or ids.shape[0] < PREFIX_BLOCK_TOKENS:
            return
        entry = RememberedPrompt(ids.detach().to("cpu", torch.int64).clone(), tuple(spans))
        if entry.nbytes > self.max_bytes:
            return
        for key in [key for key, old in self._entries.items() if _covers(entry, old)]:
            del self._entries[key]
        self._entries[self._next] = entry
        self._next += 1
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def _covers(new: RememberedPrompt, old: RememberedPrompt) -> bool:
    """`new` holds all `old` does: the same chain, over ids `old`'s are a prefix of."""
    length = old.ids.shape[0]
    return new.chain == old.chain and new.ids.shape[0] >= length and bool(torch.equal(new.ids[:length], old.ids))
