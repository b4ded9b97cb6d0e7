"""Prefix caches through a live swarm: a prompt that starts like an earlier one of the same client is
computed only past what the servers kept, the output stays exact, and nobody else reuses it."""

from __future__ import annotations

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from client.span import SpanSession
from harness.local_swarm import LocalSwarm
from tests.helpers.metrics import scrape
from tests.helpers.streamers import AtToken

pytestmark = pytest.mark.slow

NEW_TOKENS = 4


def ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(seed))


def computed(server) -> float:
    """Positions a server has computed, by its own /metrics."""
    return sum(
        sum(scrape(server.metrics_url, name).values()) for name in ("prompt_tokens_total", "generation_tokens_total")
    )


def metric(server, name: str) -> float:
    return sum(scrape(server.metrics_url, name).values())


def generate(model, prompt: torch.Tensor) -> tuple[torch.Tensor, int]:
    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        output = model.generate(prompt, max_new_tokens=NEW_TOKENS, session=session)
        return output, session.cached_tokens


def reference(ref6, prompt: torch.Tensor) -> torch.Tensor:
    return ref6.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def swarm(model6, tmp_path_factory):
    with LocalSwarm(model6, [(0, 3), (3, 6)], workdir=tmp_path_factory.mktemp("prefix")) as swarm:
        yield swarm


def test_a_prompt_that_starts_like_an_earlier_one_is_computed_only_past_the_cached_blocks(model6, ref6, swarm):
    first = ids(70, seed=1)
    second = torch.cat([first, ids(10, seed=2)], dim=1)
    # Spot checks on (the default), recomputed here: they check the outputs of the reused positions too.
    with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
        model.generation_config.eos_token_id = None
        before = [computed(server) for server in swarm.servers]
        output, cached = generate(model, first)
        assert torch.equal(output, reference(ref6, first)) and cached == 0
        middle = [computed(server) for server in swarm.servers]
        output, cached = generate(model, second)
        assert torch.equal(output, reference(ref6, second))
        after = [computed(server) for server in swarm.servers]
        assert model.convicted == {}
    assert cached == 64  # the first prompt's 4 whole blocks of 16
    for server, b, m, a in zip(swarm.servers, before, middle, after):
        assert m - b == 70 + NEW_TOKENS - 1
        assert a - m == 80 - 64 + NEW_TOKENS - 1
        assert metric(server, "prefix_cache_hits_total") == 64
        assert metric(server, "prefix_cache_queries_total") == 70 + 80


def test_the_same_prompt_of_whole_blocks_again_leaves_its_last_token_to_compute(model6, ref6, swarm):
    """A prompt of exactly 4 blocks, sent twice: the servers hold all of it, but its last token is
    computed again (its logits are the first new token's)."""
    prompt = ids(64, seed=9)
    with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
        first, cached = generate(model, prompt)
        assert cached == 0 and torch.equal(first, reference(ref6, prompt))
        output, cached = generate(model, prompt)
    assert cached == 48 and torch.equal(output, reference(ref6, prompt))


def test_a_servers_prefix_is_reused_by_the_client_that_computed_it_only(model6, swarm):
    prompt = ids(40, seed=3)
    with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as owner:
        generate(owner, prompt)
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as stranger:
            for client, expected in ((stranger, 0), (owner, 32)):
                remote = client.remote
                for plan in remote.runtime.run(remote.make_chain()):
                    span = SpanSession(plan, 30.0)
                    remote.runtime.run(span.open(remote.p2p, remote.model_name, 1, 64, (), prompt[0], reuse=32))
                    try:
                        assert span.cached == expected
                    finally:
                        remote.runtime.run(span.close())


def test_spans_that_disagree_resume_from_the_shortest_hit_and_stay_exact(model6, ref6, tmp_path):
    first = ids(70, seed=4)
    second = torch.cat([first, ids(12, seed=5)], dim=1)
    with LocalSwarm(model6, [(0, 3)], workdir=tmp_path / "swarm") as swarm:
        small = swarm.add_server(3, 6, "--prefix-cache-tokens", "32")  # keeps 2 of the prompt's 4 blocks
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
            model.generation_config.eos_token_id = None
            generate(model, first)
            middle = computed(swarm.servers[0])
            output, cached = generate(model, second)
        assert torch.equal(output, reference(ref6, second))
        assert cached == 32
        assert metric(swarm.servers[0], "prefix_cache_hits_total") == 64  # it had all four, and rewound
        assert metric(small, "prefix_cache_hits_total") == 32
        assert computed(swarm.servers[0]) - middle == 82 - 32 + NEW_TOKENS - 1


def test_a_server_started_with_no_prefix_cache_keeps_no_prompt(model6, ref6, tmp_path):
    prompt = ids(40, seed=6)
    with LocalSwarm(model6, [(0, 6)], server_args=["--no-prefix-cache"], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
            model.generation_config.eos_token_id = None
            generate(model, prompt)
            output, cached = generate(model, prompt)
        assert cached == 0 and torch.equal(output, reference(ref6, prompt))
        assert metric(swarm.servers[0], "prefix_cache_queries_total") == 0


def test_a_server_killed_after_a_reused_prefix_is_replaced_from_the_remembered_inputs(model6, ref6, tmp_path):
    first = ids(50, seed=7)
    second = torch.cat([first, ids(6, seed=8)], dim=1)
    expected = ref6.generate(second, max_new_tokens=12, do_sample=False, eos_token_id=None)
    splits = [(0, 3), (3, 6), (3, 6)]
    with LocalSwarm(model6, splits, server_args=["--throughput", "100"], workdir=tmp_path / "swarm") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            model.generation_config.eos_token_id = None
            generate(model, first)
            with model.inference_session(max_length=second.shape[1] + 12) as session:
                streamer = AtToken(4, lambda: swarm.server(session.chain[-1][0]).kill())
                output = model.generate(second, max_new_tokens=12, session=session, streamer=streamer)
                assert session.cached_tokens == 48 and session.failovers >= 1
            assert model.convicted == {}  # the replacement's checks agree with what was remembered
    assert torch.equal(output, expected)
