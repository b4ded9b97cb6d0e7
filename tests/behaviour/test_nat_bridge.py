"""A server behind a real NAT (network namespaces, iptables masquerade) serves blocks that nobody
else serves, with default flags: it finds itself unreachable, attaches to bridges, and a client
on the public side generates through it, token-identical to transformers, across the loss of the
bridge its session went through."""

from __future__ import annotations

import json

import pytest
import torch

from blocks.synthetic import make_random_checkpoint
from tests.helpers.models import reference_model
from tests.helpers.netns import HOME_IP, PUBLIC_IP, NatTopology, Process, start_bootstrap, start_server

WHY_NOT = NatTopology.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]

NEW_TOKENS = 12
PAUSE_AT = 5


def test_a_server_behind_nat_serves_through_bridges_and_survives_losing_one(tmp_path):
    model = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=4, seed=21)
    prompt = torch.randint(3, 100, (1, 6))
    expected = reference_model(model).generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    processes: list[Process] = []
    with NatTopology() as nat:
        try:
            first, first_addr = start_bootstrap(nat, tmp_path, "bootstrap1", 31401, [])
            processes.append(first)
            second, second_addr = start_bootstrap(nat, tmp_path, "bootstrap2", 31402, [first_addr])
            processes.append(second)
            peers = [first_addr, second_addr]
            public, _ = start_server(nat, tmp_path, "public", "public", PUBLIC_IP, model, "0:2", peers)
            processes.append(public)
            home, home_id = start_server(nat, tmp_path, "home", "home", HOME_IP, model, "2:4", peers)  # default flags
            processes.append(home)
            client = Process(
                nat,
                "public",
                [
                    "-m",
                    "tests.helpers.nat_client",
                    str(model),
                    ",".join(peers),
                    home_id,
                    str(PAUSE_AT),
                    str(NEW_TOKENS),
                    json.dumps(prompt[0].tolist()),
                ],
                tmp_path / "client.log",
                stdin=True,
            )
            processes.append(client)

            record = client.json("record")
            assert record["reachable"] is False
            assert all(HOME_IP in addr for addr in record["addrs"])  # what it listens on: useless to the public side
            bridges = record["bridge_addrs"]
            assert len(bridges) == 2 and all(addr.startswith(f"/ip4/{PUBLIC_IP}/tcp/") for addr in bridges)

            # Mid-generation, the bridge that clients try first (the session's) dies with its daemons.
            assert client.json("paused") == PAUSE_AT
            lost = bridges[0]
            {first_addr: first, second_addr: second}[lost].kill()
            client.send("go")
            assert torch.equal(torch.tensor([client.json("tokens")]), expected)

            client.send(lost)
            after = client.json("record_after")
            assert after["reachable"] is False and lost not in after["bridge_addrs"] and after["bridge_addrs"]
            home_log = (tmp_path / "home.log").read_text()
            assert "unreachable" in home_log and "lost bridge" in home_log
        finally:
            for process in reversed(processes):
                process.kill()
