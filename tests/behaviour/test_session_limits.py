"""A session goes to a server that can hold it: routing reads each server's length and cache limits, a
refusal for size sends the session elsewhere, and `longest_session()` is what one chain can hold."""

from __future__ import annotations

import pytest
import torch

from client import AutoDistributedModelForCausalLM, BadRequestError
from harness.local_swarm import LocalSwarm
from tests.helpers.models import wait_for_route

NEW_TOKENS = 110  # with the prompt, more than the shallow server's 64 cache tokens


@pytest.fixture(scope="module")
def limits_swarm(llama_path, tmp_path_factory):
    """Three servers of all 4 blocks. The two fast ones cannot hold what their records seem to allow:
    "shallow" announces max_length 4096 but has 64 cache tokens in all; "narrow" takes batch 1 only
    (a limit no record carries). "roomy" is slow and holds sessions of up to 200 tokens, any batch.
    Their speeds are far apart (0.1 ms, 10 ms and 1 s a token), so that no ping on a loaded machine
    reorders them: 10 000 against 5 000 tokens/s once made "narrow" the faster chain for 120 s."""
    with LocalSwarm(llama_path, [], workdir=tmp_path_factory.mktemp("limits-swarm")) as swarm:
        shallow = swarm.add_server(0, 4, "--throughput", "10000", "--max-length", "4096", "--cache-tokens", "64")
        narrow = swarm.add_server(
            0, 4, "--throughput", "100", "--max-length", "4096", "--cache-tokens", "300", "--max-batch-size", "1"
        )
        roomy = swarm.add_server(0, 4, "--throughput", "1", "--max-length", "200")
        swarm.names = {shallow.peer_id: "shallow", narrow.peer_id: "narrow", roomy.peer_id: "roomy"}
        yield swarm


@pytest.fixture(scope="module")
def limits_client(limits_swarm, llama_path):
    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, limits_swarm.initial_peers, request_timeout=30
    ) as model:
        shallow = next(peer for peer, name in limits_swarm.names.items() if name == "shallow")
        wait_for_route(model, shallow)  # all three are routable: the fastest is chosen for a short session
        yield model


def generate_on(model, ids, names):
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
        return output, [names[peer] for peer, _, _ in session.chain]


def test_a_session_longer_than_the_fastest_server_holds_goes_to_one_that_holds_it(
    limits_client, limits_swarm, llama_ref
):
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(1))
    output, chain = generate_on(limits_client, ids, limits_swarm.names)
    assert torch.equal(output, llama_ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert chain == ["narrow"]  # "shallow" is faster, but its whole cache is 64 tokens


def test_a_server_refusing_a_session_for_its_size_sends_it_elsewhere(limits_client, limits_swarm, llama_ref):
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    output, chain = generate_on(limits_client, ids, limits_swarm.names)
    assert torch.equal(output, llama_ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert chain == ["roomy"]  # "narrow" refused batch 2, which its record does not say


def test_a_stateless_forward_goes_to_a_server_that_holds_it(limits_client, llama_ref):
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = llama_ref(ids).logits
    torch.testing.assert_close(limits_client(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_longest_session_is_what_a_server_really_holds(limits_client):
    assert limits_client.longest_session() == 300  # narrow's cache; shallow's 4096 is capped by its 64 tokens


def test_a_session_longer_than_any_server_holds_is_a_clear_error(limits_client):
    with pytest.raises(BadRequestError, match="accepts a session of 350 tokens at batch 1: the longest they accept"):
        with limits_client.inference_session(max_length=350) as session:
            limits_client.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, session=session)
