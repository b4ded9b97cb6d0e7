"""A real `swarm.serve` whose block computation goes wrong after FAULTY_SERVER_FAIL_AFTER sessions' steps.

FAULTY_SERVER_MODE says how: `error` (default) raises, so the real handler answers every later step
with a server-error reply, as a server with a broken GPU would; `nan` returns outputs full of NaN,
and `dtype` returns float64 outputs (replies that parse but are wrong). The client's failover is
what the tests exercise.

FAULTY_SERVER_LOAD_FAIL makes loading blocks fail as running out of memory would: a comma-separated
list of `start:end` ranges whose loading fails, or `*` for every load after the first.
"""

import os
import sys

import torch

import swarm.server as server_module
from blocks.span import BlockSpan
from swarm.serve import main

_fail_after = int(os.environ.get("FAULTY_SERVER_FAIL_AFTER", "0"))
_mode = os.environ.get("FAULTY_SERVER_MODE", "error")
_forward_batch = BlockSpan.forward_batch
_calls = 0


def _failing_forward_batch(self, inputs, *args, **kwargs):
    """Counts each session's step in a batch as one call; a batch holding a step past the limit fails."""
    global _calls
    _calls += len(inputs)
    if _calls <= _fail_after:
        return _forward_batch(self, inputs, *args, **kwargs)
    if _mode == "nan":
        return [torch.full_like(output, float("nan")) for output in _forward_batch(self, inputs, *args, **kwargs)]
    if _mode == "dtype":
        return [output.to(torch.float64) for output in _forward_batch(self, inputs, *args, **kwargs)]
    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")


BlockSpan.forward_batch = _failing_forward_batch

_load_fail = os.environ.get("FAULTY_SERVER_LOAD_FAIL", "")
_load_span = server_module.load_span
_loads = 0


def _failing_load(checkpoint, start, end, *args, **kwargs):
    global _loads
    _loads += 1
    if (_load_fail == "*" and _loads > 1) or f"{start}:{end}" in _load_fail.split(","):
        raise RuntimeError(f"out of memory loading blocks {start}:{end} (injected)")
    return _load_span(checkpoint, start, end, *args, **kwargs)


server_module.load_span = _failing_load

if __name__ == "__main__":
    sys.exit(main())
