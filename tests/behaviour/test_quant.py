"""Quantized servers in a live swarm: the client chooses which quantizations it accepts (exact output
with "none"), a quantized chain computes what the same quantization computes locally, honest int8 and
nf4 servers are never accused over hundreds of spot checks, and a tampered int8 server is caught."""

from __future__ import annotations

import pytest
import torch

from blocks.checkpoint import Checkpoint
from blocks.loading import load_head, load_span
from client import AutoDistributedModelForCausalLM, MissingBlocksError
from client.audit import CHECK_LAG
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt
from tests.helpers.models import wait_for_route

NEW_TOKENS = 8


def local_greedy(path, ids: torch.Tensor, new_tokens: int, quant: str) -> torch.Tensor:
    """Greedy generation in this process with the blocks quantized as `quant` (no cache: every step
    recomputes the whole sequence)."""
    checkpoint = Checkpoint(path)
    head, span = load_head(checkpoint), load_span(checkpoint, 0, checkpoint.num_blocks, quant=quant)
    for _ in range(new_tokens):
        logits = head.logits(span.forward(head.embed_tokens(ids)))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(scope="module")
def mixed_swarm(model6, tmp_path_factory):
    """The whole model three times: full precision, int8 and nf4."""
    with LocalSwarm(model6, [], server_args=["--throughput", "100"], workdir=tmp_path_factory.mktemp("quant")) as swarm:
        for quant in ("none", "int8", "nf4"):
            swarm.add_server(0, 6, "--quant", quant, wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        yield swarm


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_a_client_uses_only_the_quantization_it_accepts(quant, model6, ref6, mixed_swarm):
    ids = prompt(1)
    server = mixed_swarm.servers[("none", "int8", "nf4").index(quant)]
    with AutoDistributedModelForCausalLM.from_pretrained(
        model6, mixed_swarm.initial_peers, quant=quant if quant == "none" else [quant], verify=1.0
    ) as model:
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
            assert session.chain == [(server.peer_id, 0, 6)]
            assert session.quant_modes == {quant}
        assert model.convicted == {}
    if quant == "none":
        assert torch.equal(output, ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    else:  # what the same quantization computes here, token for token
        assert torch.equal(output, local_greedy(model6, ids, NEW_TOKENS, quant))


def test_exact_output_is_refused_where_only_quantized_servers_serve(model6, tmp_path):
    with LocalSwarm(model6, [(0, 6)], server_args=["--quant", "int8"], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, quant="none") as model:
            with pytest.raises(MissingBlocksError, match="with quantization none serves block"):
                model.generate(prompt(0), max_new_tokens=2)
        with pytest.raises(ValueError, match="quant must be 'any'"):
            AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, quant=["int4"])


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_honest_quantized_servers_are_never_accused(quant, model6, tmp_path):
    """Fast quantized servers take the sessions; their checks go to another server of the same
    quantization (never to the full-precision one beside them) or to the local referee, which
    quantizes its own copy the same way: dozens of checks at least, nobody accused."""
    with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
        for start, end, throughput in ((0, 3, 100000), (3, 6, 100000), (0, 6, 10)):
            swarm.add_server(start, end, "--quant", quant, "--throughput", str(throughput), wait=False)
        swarm.add_server(0, 6, "--throughput", "10", wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=1.0) as model:
            wait_for_route(model, swarm.servers[0].peer_id, swarm.servers[1].peer_id)
            for seed in range(5):
                model.generate(prompt(seed), max_new_tokens=48)
            # Every step draws a check (verify=1.0), and one starts whenever the span's last is done;
            # how many that makes depends on the machine's speed, but a session never runs more than
            # CHECK_LAG steps past a span's check: at least this many per span and generation.
            checks = model.remote.audit.verifier.checks
            assert checks >= 5 * 2 * (1 + (48 - 1) // (CHECK_LAG + 1)), checks
            assert model.convicted == {}


def test_a_tampered_int8_server_is_caught(model6, tmp_path, tmp_path_factory):
    from blocks.synthetic import make_random_checkpoint

    other = make_random_checkpoint(tmp_path_factory.mktemp("tampered") / "llama6", "llama", num_layers=6, seed=8)
    with LocalSwarm(model6, [(0, 6)], server_args=["--quant", "int8"], workdir=tmp_path / "swarm") as swarm:
        liar = swarm.add_server(
            0,
            6,
            "--quant",
            "int8",
            "--throughput",
            "10000",
            module="tests.helpers.lying_server",
            env={"LYING_SERVER_MODE": "checkpoint", "LYING_SERVER_CHECKPOINT": str(other)},
        )
        ids = prompt(2)
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0.2) as model:
            wait_for_route(model, liar.peer_id)
            output = model.generate(ids, max_new_tokens=NEW_TOKENS)
            assert liar.peer_id in model.convicted
            evidence = model.convicted[liar.peer_id]
            assert evidence.quant == "int8" and evidence.claimed_error > evidence.tolerance
        assert torch.equal(output, local_greedy(model6, ids, NEW_TOKENS, "int8"))
