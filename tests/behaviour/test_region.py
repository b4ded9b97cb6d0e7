"""Region affinity in a live swarm: two chains, one per region, and a client in each picks its own."""

from __future__ import annotations

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt


def test_a_client_in_each_region_picks_the_chain_of_its_region(model6, ref6, tmp_path):
    with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
        # The same announced throughput: comparable chains, which only their regions tell apart (a
        # throughput measured while the machine is busy could make one chain faster by more than a
        # region's cost, and then rightly chosen).
        europe = swarm.add_server(0, 6, "--region", "europe-west", "--throughput", "1000")
        america = swarm.add_server(0, 6, "--region", "america-north", "--throughput", "1000")
        ids = prompt(2)
        expected = ref6.generate(ids, max_new_tokens=8, do_sample=False)
        for region, server in (("europe-west", europe), ("america-north", america)):
            with AutoDistributedModelForCausalLM.from_pretrained(
                model6, swarm.initial_peers, region=region, verify=0
            ) as model:
                with model.inference_session(max_length=ids.shape[1] + 8) as session:
                    assert torch.equal(model.generate(ids, max_new_tokens=8, session=session), expected)
                    assert session.chain == [(server.peer_id, 0, 6)], region
        # One session may prefer another region than its client's (the relay's jobs do so).
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, region="europe-west", verify=0
        ) as model:
            with model.inference_session(max_length=ids.shape[1] + 8, region="america-north") as session:
                assert torch.equal(model.generate(ids, max_new_tokens=8, session=session), expected)
                assert session.chain == [(america.peer_id, 0, 6)]
            with pytest.raises(ValueError, match="unknown region 'mars'"):
                model.inference_session(max_length=8, region="mars")
