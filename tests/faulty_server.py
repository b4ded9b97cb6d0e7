"""A real `swarm.serve` whose block computation starts failing after FAULTY_SERVER_FAIL_AFTER forward calls.

It answers every later step with a server-error reply through the real handler, as a server with a
broken GPU would; the client's failover is what the tests exercise.
"""

import os
import sys

from blocks.span import BlockSpan
from swarm.serve import main

_fail_after = int(os.environ.get("FAULTY_SERVER_FAIL_AFTER", "0"))
_forward = BlockSpan.forward
_calls = 0


def _failing_forward(self, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls > _fail_after:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    return _forward(self, *args, **kwargs)


BlockSpan.forward = _failing_forward

if __name__ == "__main__":
    sys.exit(main())
