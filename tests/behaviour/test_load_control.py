"""Servers apply the load control an owner sets through flags, environment and YAML."""

from __future__ import annotations

import datetime as dt

import pytest


@pytest.mark.slow
def test_servers_apply_load_control_from_flags_env_and_yaml(tmp_path):
    import torch

    from blocks.synthetic import make_random_checkpoint
    from client import AutoDistributedModelForCausalLM
    from harness.local_swarm import LocalSwarm
    from tests.helpers.models import reference_model, wait_for_route

    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=4, seed=12)
    ids = torch.randint(3, 100, (1, 5))
    expected = reference_model(path).generate(ids, max_new_tokens=8, do_sample=False)
    later = (dt.datetime.now() + dt.timedelta(hours=2)).time()
    closed_window = f"{later:%H:00}-{(dt.datetime.combine(dt.date.today(), later) + dt.timedelta(hours=1)):%H:00}"
    yaml_file = tmp_path / "limited.yaml"
    yaml_file.write_text("max_concurrent_sessions: 1\nthroughput: 1000\n")
    with LocalSwarm(path, [], workdir=tmp_path / "swarm") as swarm:
        limited = swarm.add_server(0, 4, "--config", str(yaml_file))
        sleeping = swarm.add_server(0, 4, "--throughput", "1000", env={"SWARM_WORKING_HOURS": closed_window})
        normal = swarm.add_server(0, 4, "--throughput", "1")
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=60) as model:
            wait_for_route(model, limited.peer_id)
            with model.inference_session(30) as first, model.inference_session(30) as second:
                assert torch.equal(model.generate(ids, max_new_tokens=8, session=first), expected)
                assert torch.equal(model.generate(ids, max_new_tokens=8, session=second), expected)
                assert first.chain[0][0] == limited.peer_id  # fastest available server
                assert second.chain[0][0] == normal.peer_id  # the limited one is full, the other sleeps
        assert "outside" not in sleeping.log_path.read_text()  # never even asked: it announces itself unavailable
        assert "the owner allows 1" in limited.log_path.read_text()
