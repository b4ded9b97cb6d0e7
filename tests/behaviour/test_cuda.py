"""The cuda path: servers with `--device cuda` and a client with `device="cuda"` (needs a CUDA GPU).

Every tensor that travels is copied to host off the event loops after the compute has finished (the
servers' compute thread, the client's worker threads); these tests drive the whole path on a GPU."""

from __future__ import annotations

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt
from verification.tolerance import discrepancy, tolerance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

NEW_TOKENS = 16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_servers_and_client_generate_checked_text(model6, ref6, tmp_path, dtype):
    """Two servers per block range on the GPU, the client's head there too, every step spot-checked:
    logits agree with single-process transformers within the dtype's tolerance, generation runs with
    no dispute, and float32 generates exactly transformers' tokens."""
    args = ["--device", "cuda", "--dtype", dtype]
    ranges = [(0, 3), (3, 6), (0, 3), (3, 6)]
    with LocalSwarm(model6, ranges, server_args=args, workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, device="cuda", dtype=getattr(torch, dtype), verify=1.0, request_timeout=60
        ) as model:
            ids = prompt(0)
            logits = model(ids).logits
            assert logits.device.type == "cuda"
            expected = ref6(ids).logits
            limit = tolerance(getattr(torch, dtype), torch.float32, 6)  # six blocks
            assert discrepancy(logits.float().cpu(), expected) <= limit
            output = model.generate(ids, max_new_tokens=NEW_TOKENS)
            assert output.shape == (1, ids.shape[1] + NEW_TOKENS)
            if dtype == "float32":
                assert torch.equal(output.cpu(), ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
            verifier = model.remote.audit.verifier
            assert verifier.checks >= 2 and verifier.disputes == 0 and not model.convicted
