"""A real `swarm.serve` that returns plausible but wrong hidden states, for the spot-check tests.

LYING_SERVER_MODE says how:
- `noise` (default): adds Gaussian noise of LYING_SERVER_SCALE (default 0.5) times each row's norm;
- `checkpoint`: runs the weights of another checkpoint of the same architecture (LYING_SERVER_CHECKPOINT);
- `precision`: runs its weights rounded to bfloat16 while it announces and computes in float32;
- `push`: computes honestly and returns the right output to the client, but pushes a noisy one to
  the next server of the chain;
- `bad_push`: the same, but what it pushes has one value too few per row (a malformed step).

`noise` applies to a session's step with probability LYING_SERVER_PROBABILITY (default 1), only after
LYING_SERVER_AFTER of that session's steps (default 0), and with LYING_SERVER_SESSIONS=odd only in every
other session (the 1st, 3rd, … this server sees). Stateless forwards (which others use to check it)
count as sessions too: a liar does not know which requests are checks.
"""

import os
import random
import sys

import torch

import swarm.server as server_module
from blocks.span import BlockSpan
from swarm.handler import BlockHandler
from swarm.serve import main

_mode = os.environ.get("LYING_SERVER_MODE", "noise")
_scale = float(os.environ.get("LYING_SERVER_SCALE", "0.5"))
_probability = float(os.environ.get("LYING_SERVER_PROBABILITY", "1"))
_after = int(os.environ.get("LYING_SERVER_AFTER", "0"))
_odd_only = os.environ.get("LYING_SERVER_SESSIONS", "all") == "odd"
_rng = random.Random(int(os.environ.get("LYING_SERVER_SEED", "0")))
_forward_batch = BlockSpan.forward_batch
_sessions: dict[int, list[int]] = {}  # id(cache) -> [session number, steps so far]


def _lying_forward_batch(self, inputs, *args, **kwargs):
    outputs = _forward_batch(self, inputs, *args, **kwargs)
    lied = []
    for step, output in zip(inputs, outputs):
        seen = _sessions.setdefault(id(step.cache), [len(_sessions), 0])
        seen[1] += 1
        lies = seen[1] > _after and (not _odd_only or seen[0] % 2 == 0) and _rng.random() < _probability
        if lies:
            output = _noisy(output)
        lied.append(output)
    return lied


def _noisy(output):
    noise = torch.randn_like(output) * output.norm(dim=-1, keepdim=True) / output.shape[-1] ** 0.5
    return output + _scale * noise


_push_on = BlockHandler.push_on


def _lying_push_on(self, session, step, output, mask):
    return _push_on(self, session, step, _noisy(output), mask)


def _malformed_push_on(self, session, step, output, mask):
    return _push_on(self, session, step, output[..., :-1], mask)


def _other_checkpoint_load(checkpoint, start, end, *args, **kwargs):
    from blocks.checkpoint import Checkpoint

    return _load_span(Checkpoint(os.environ["LYING_SERVER_CHECKPOINT"]), start, end, *args, **kwargs)


def _rounded_load(checkpoint, start, end, dtype=torch.float32, *args, **kwargs):
    span = _load_span(checkpoint, start, end, dtype, *args, **kwargs)
    with torch.no_grad():
        for layer in span.layers:
            for parameter in layer.parameters():
                parameter.copy_(parameter.to(torch.bfloat16).to(parameter.dtype))
    return span


_load_span = server_module.load_span
if _mode == "noise":
    BlockSpan.forward_batch = _lying_forward_batch
elif _mode == "checkpoint":
    server_module.load_span = _other_checkpoint_load
elif _mode == "precision":
    server_module.load_span = _rounded_load
elif _mode == "push":
    BlockHandler.push_on = _lying_push_on
elif _mode == "bad_push":
    BlockHandler.push_on = _malformed_push_on
else:
    raise SystemExit(f"unknown LYING_SERVER_MODE {_mode!r}")

if __name__ == "__main__":
    sys.exit(main())
