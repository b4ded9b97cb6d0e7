"""A span's KV cache as one preallocated tensor: sessions get contiguous slices and write in place.

The pool is allocated (and touched) once, when a server starts serving a span, so the cache budget
is memory the process already holds: a long generation or hundreds of sessions neither grow nor
fragment the heap. A session's slice is `batch × max_length` tokens; a step writes its keys and
values at their positions, and attention reads a view of the tokens written so far.
"""

from __future__ import annotations

import bisect
import threading

import torch


class PoolFull(Exception):
    """No contiguous run of free tokens is long enough (the caller answers BUSY)."""


class KVPool:
    """Storage `[layers, 2, kv_heads, tokens, head_dim]` and a first-fit allocator over its tokens."""

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, tokens: int, dtype: torch.dtype, device: torch.device | str
    ):
        self.num_layers = num_layers
        self.tokens = tokens
        # zeros, not empty: the pages are touched now, so the budget is resident from the start.
        self.storage = torch.zeros(num_layers, 2, kv_heads, tokens, head_dim, dtype=dtype, device=device)
        self._free: list[tuple[int, int]] = [(0, tokens)]  # sorted (start, length) runs
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def allocate(self, batch: int, max_length: int) -> "PooledCache":
        size = batch * max_length
        with self._lock:
            for index, (start, length) in enumerate(self._free):
                if length >= size:
                    if length == size:
                        del self._free[index]
                    else:
                        self._free[index] = (start + size, length - size)
                    return PooledCache(self, start, batch, max_length)
        raise PoolFull(f"no contiguous run of {size} cache tokens is free")

    @property
    def free(self) -> int:
        """Tokens not in any session's slice (perhaps in several runs)."""
        with self._lock:
            return sum(length for _, length in self._free)

    def largest_free_run(self) -> int:
        with self._lock:
            return max((length for _, length in self._free), default=0)

    def give_back(self, start: int, size: int) -> None:
        """Returns tokens [start, start + size) to the free runs (a session's slice, or a cached page)."""
        with self._lock:
            index = bisect.bisect(self._free, (start, size))
            self._free.insert(index, (start, size))
            merged: list[tuple[int, int]] = []
            for run_start, run_length in self._free:
                if merged and merged[-1][0] + merged[-1][1] == run_start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + run_length)
                else:
                    merged.append((run_start, run_length))
            self._free = merged


class PooledCache:
    """One session's slice of the pool; the same `update`/`length` interface as `blocks.layers.KVCache`."""

    def __init__(self, pool: KVPool, start: int, batch: int, max_length: int):
        self._pool = pool
        self._start = start
        self._size = batch * max_length
        self.max_length = max_length
        region = pool.storage[:, :, :, start : start + self._size]  # [layers, 2, kv_heads, batch·max_length, head_dim]
        layers, _, kv_heads, _, head_dim = region.shape
        # [layers, 2, batch, kv_heads, max_length, head_dim]: a view, nothing is copied.
        self._views = region.view(layers, 2, kv_heads, batch, max_length, head_dim).permute(0, 1, 3, 2, 4, 5)
        self._lengths = [0] * layers
        self._released = False

    def length(self, layer: int) -> int:
        return self._lengths[layer]

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def restore(self, lengths: list[int]) -> None:
        """Forgets tokens written after `lengths` was taken (their slots are simply overwritten later)."""
        self._lengths = list(lengths)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self._lengths[layer]
        end = past + keys.shape[2]
        if end > self.max_length:
            raise ValueError(f"{end} tokens exceed the session's {self.max_length} cache slots")
        if self._released:
            raise RuntimeError("the session's cache was given back")
        stored = self._views[layer]
        stored[0, :, :, past:end] = keys
        stored[1, :, :, past:end] = values
        self._lengths[layer] = end
        return stored[0, :, :, :end], stored[1, :, :, :end]

    def release(self, keep: int = 0) -> int:
        """Gives the slice back to the pool, once, except its first `keep` tokens of row 0 (a batch of
        one only): those stay allocated as pool tokens [returned start, start + keep), for the caller
        to hand back to the pool later (the prefix cache keeps a finished prompt's KV so)."""
        if self._released:
            return -1
        if keep and self._size != self.max_length:
            raise ValueError("only a batch of one keeps its tokens")
        self._released = True
        self._views = None
        self._pool.give_back(self._start + keep, self._size - keep)
        return self._start

    def export(self, position: int, chunk_tokens: int, first: int, count: int, begin: int = 0) -> list[torch.Tensor]:
        """Copies of positions [begin, position) of layers [first, first + count), `chunk_tokens` at a
        time, on the host: [count, 2, batch, kv_heads, tokens, head_dim] each (what another server
        takes with `write_layers`)."""
        if self._released or any(length < position for length in self._lengths[first : first + count]):
            raise ValueError(f"the cache does not hold {position} positions in layers {first}:{first + count}")
        layers = self._views[first : first + count]
        return [
            layers[:, :, :, :, start : min(start + chunk_tokens, position)].to("cpu", copy=True).contiguous()
            for start in range(begin, position, chunk_tokens)
        ]

    def write_layers(self, chunk: torch.Tensor, at: int, first: int) -> None:
        """Writes `chunk` ([count, 2, batch, kv_heads, tokens, head_dim], as `export` gives) at positions
        [at, at + tokens) of layers [first, first + count), which then hold that many positions."""
        count, tokens = chunk.shape[0], chunk.shape[4]
        lengths = self._lengths[first : first + count]
        if self._released or at + tokens > self.max_length or len(lengths) != count or any(n != at for n in lengths):
            raise ValueError(f"cannot write {tokens} positions at {at} into layers {first}:{first + count}")
        self._views[first : first + count, :, :, :, at : at + tokens] = chunk.to(self._views.device, self._views.dtype)
        self._lengths[first : first + count] = [at + tokens] * count

    def fill(self, sources: torch.Tensor) -> None:
        """Copies the pool tokens at `sources` (absolute indices, in order) into positions [0, n) of
        row 0, in every layer, and makes them the session's tokens: a cached prefix reused."""
        count = sources.shape[0]
        if count > self.max_length or self._released:
            raise ValueError(f"cannot fill {count} tokens into this cache")
        storage = self._pool.storage
        storage[:, :, :, self._start : self._start + count] = storage.index_select(3, sources.to(storage.device))
        self._lengths = [count] * len(self._lengths)
