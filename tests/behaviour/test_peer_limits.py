"""One greedy peer cannot take a server from everyone else: past its share of the cache (or its count
of sessions) it is answered busy, while another peer still gets served, token-identically."""

from __future__ import annotations

import contextlib

import pytest
import torch

from client import AutoDistributedModelForCausalLM, SwarmBusyError
from harness.local_swarm import LocalSwarm


def test_a_greedy_peer_is_held_to_its_share_and_an_honest_one_is_still_served(llama_path, llama_ref, tmp_path):
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(16))
    expected = llama_ref.generate(ids, max_new_tokens=8, do_sample=False)
    # 256 cache tokens, sessions of up to 64: without per-peer limits one peer could hold all four.
    with LocalSwarm(
        llama_path, [(0, 4)], server_args=["--cache-tokens", "256", "--max-length", "64"], workdir=tmp_path / "swarm"
    ) as swarm:
        with (
            AutoDistributedModelForCausalLM.from_pretrained(llama_path, swarm.initial_peers) as greedy,
            AutoDistributedModelForCausalLM.from_pretrained(llama_path, swarm.initial_peers) as honest,
            contextlib.ExitStack() as held,
        ):
            for _ in range(2):  # half the cache (the default share): held idle
                session = held.enter_context(greedy.inference_session(max_length=64))
                greedy.generate(ids, max_new_tokens=1, session=session)
            with greedy.inference_session(max_length=64) as third:
                with pytest.raises(SwarmBusyError):
                    greedy.generate(ids, max_new_tokens=1, session=third)
            with honest.inference_session(max_length=64) as session:
                output = honest.generate(ids, max_new_tokens=8, session=session)
        assert "per-peer limit" in swarm.servers[0].log_path.read_text()
    assert torch.equal(output, expected)
