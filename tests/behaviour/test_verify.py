"""Spot checks in a live swarm: servers that return wrong results are caught, banned and their work redone;
honest servers of any dtype are never accused."""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM, ServerFailure, WrongResultWarning
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt
from tests.helpers.metrics import scrape
from tests.helpers.models import wait_for_route
from verification.evidence import Claim

NEW_TOKENS = 16


class Counter(BaseStreamer):
    """Counts new tokens (the prompt is the first put)."""

    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1

    def end(self):
        pass

    @property
    def tokens(self) -> int:
        return max(self.puts - 1, 0)


@pytest.fixture(scope="module")
def honest_swarm(model6, tmp_path_factory):
    """Two honest servers of 3 blocks each. They announce 1 token/s, so that a server a test adds at
    100 or 10 000 is the one routing chooses whatever the pings on a loaded machine. At 100 tokens/s,
    a ping 20 ms slower was enough to route around the liar. One run under load convicted the liar
    but rolled no generation back, as when it is caught only as a referee."""
    with LocalSwarm(
        model6, [(0, 3), (3, 6)], server_args=["--throughput", "1"], workdir=tmp_path_factory.mktemp("verify-swarm")
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("verify-other") / "llama6", "llama", num_layers=6, seed=8)


LIARS = {
    "always wrong": ({}, 1.0),
    "wrong 30 % of steps": ({"LYING_SERVER_PROBABILITY": "0.3"}, 0.5),
    "wrong after 6 steps": ({"LYING_SERVER_AFTER": "6"}, 0.5),
    "wrong in every other session": ({"LYING_SERVER_SESSIONS": "odd"}, 0.5),
    "another checkpoint": ({"LYING_SERVER_MODE": "checkpoint"}, 0.1),
    "lower precision": ({"LYING_SERVER_MODE": "precision"}, 0.1),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(LIARS))
def test_a_lying_server_is_caught_banned_and_its_work_redone(kind, model6, ref6, honest_swarm, other_checkpoint):
    env, rate = LIARS[kind]
    env = {**env, "LYING_SERVER_CHECKPOINT": str(other_checkpoint)}
    # The liar announces the whole model at a high throughput: every chain starts with it.
    liar = honest_swarm.add_server(0, 6, "--throughput", "10000", module="tests.helpers.lying_server", env=env)
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, honest_swarm.initial_peers, request_timeout=60, verify=rate
        ) as model:
            caught_at = []
            streamer = Counter()
            model.on_wrong_result(lambda evidence: caught_at.append(streamer.tokens))
            wait_for_route(model, liar.peer_id)
            outputs = []
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                for seed in range(3):  # several sessions, for the liar that lies in some of them only
                    ids = prompt(seed)
                    outputs.append((model.generate(ids, max_new_tokens=NEW_TOKENS, streamer=streamer), ids))
            assert liar.peer_id in model.convicted, f"{kind}: not caught"
            evidence = model.convicted[liar.peer_id]
            assert evidence.claimed_error > evidence.tolerance and evidence.referee == "client"
            assert liar.peer_id in model.remote.bans.banned()
            if kind == "always wrong":
                assert caught_at[0] <= 5
            assert any(issubclass(w.category, WrongResultWarning) and liar.peer_id in str(w.message) for w in warned)
        for output, ids in outputs:
            assert torch.equal(output, ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)), kind
    finally:
        liar.stop()


@pytest.mark.slow
def test_a_check_waiting_on_a_server_that_a_session_found_dead_is_abandoned(model6, tmp_path):
    """A server killed mid-request may leave a check's stream open: once any request reports that
    server failed, the check stops waiting for it (sessions wait for their lagging checks)."""
    with LocalSwarm(model6, [(0, 6)], workdir=tmp_path / "swarm") as swarm:
        verifier = swarm.servers[0]
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=3600, verify=1.0
        ) as model:
            remote = model.remote
            inputs = torch.randn(1, 4, remote.checkpoint.hidden_size)
            claim = Claim(
                peer_id="QmSomeOtherServer",
                start=0,
                end=6,
                dtype=torch.float32,
                inputs=inputs,
                outputs=inputs,
                mask=None,
                verified=0,
            )
            verifier.signal(signal.SIGSTOP)  # hung: it would hold the check for the whole request timeout
            try:
                remote.runtime.loop.call_soon_threadsafe(
                    remote.runtime.loop.call_later, 8, remote.failures.report, verifier.peer_id, "step failed"
                )
                with pytest.raises(ServerFailure, match="failed in another request"):
                    remote.runtime.run(remote.audit.recompute(claim, frozenset({claim.peer_id})), 300)
            finally:
                verifier.signal(signal.SIGCONT)
            assert verifier.peer_id in remote.bans.banned()


@pytest.mark.slow
def test_honest_bf16_and_fp32_servers_of_the_same_blocks_are_never_accused(model6, tmp_path):
    """A float32 claim checked by a bfloat16 server and a bfloat16 claim checked by a float32 one, at
    every step: no dispute at all, so no referee is even asked."""
    with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
        # The slow ones announce 100 ms of compute per step against the fast ones' 1 ms, far more than
        # pings on a loaded machine differ by: routing keeps the fast chain, and checks go to the slow.
        fast_fp32 = swarm.add_server(0, 3, "--throughput", "1000", "--dtype", "float32")
        swarm.add_server(0, 3, "--throughput", "10", "--dtype", "bfloat16")
        fast_bf16 = swarm.add_server(3, 6, "--throughput", "1000", "--dtype", "bfloat16")
        swarm.add_server(3, 6, "--throughput", "10", "--dtype", "float32")
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, verify=1.0
        ) as model:
            wait_for_route(model, fast_fp32.peer_id, fast_bf16.peer_id)
            for seed in range(4):
                with model.inference_session(max_length=64) as session:
                    model.generate(prompt(seed), max_new_tokens=NEW_TOKENS, session=session)
                    assert [peer for peer, _, _ in session.chain] == [fast_fp32.peer_id, fast_bf16.peer_id]
            verifier = model.remote.audit.verifier
            # At least each span's first step in each session (and every later step taken while no check
            # of that span was in flight: how many depends on the machine's speed).
            assert verifier.checks >= 4 * 2
            assert verifier.disputes == 0 and not model.convicted


@pytest.mark.slow
def test_a_server_that_pushes_other_outputs_than_it_returns_does_not_get_the_next_one_accused(
    model6, ref6, honest_swarm
):
    """The next server reports a digest of the input it computed on; the client sees that it is not what
    the previous server returned, stops pushing, rebuilds that cache, and nobody honest is convicted."""
    liar = honest_swarm.add_server(
        0, 3, "--throughput", "10000", module="tests.helpers.lying_server", env={"LYING_SERVER_MODE": "push"}
    )
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, honest_swarm.initial_peers, request_timeout=60, verify=1.0
        ) as model:
            wait_for_route(model, liar.peer_id)
            ids = prompt(3)
            with model.inference_session(max_length=64) as session:
                output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
                assert session.chain[0][0] == liar.peer_id and not session.push and session.failovers >= 1
            assert not model.convicted
        assert torch.equal(output, ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    finally:
        liar.stop()


@pytest.mark.slow
def test_a_server_that_pushes_malformed_steps_is_blamed_and_the_next_one_keeps_its_session(model6, ref6, honest_swarm):
    """The next server refuses the push as the pusher's fault (BAD_PUSH on the client's stream): the
    client bans the pusher, not itself, replaces it and goes on without push; the output is unchanged."""
    liar = honest_swarm.add_server(
        0, 3, "--throughput", "10000", module="tests.helpers.lying_server", env={"LYING_SERVER_MODE": "bad_push"}
    )
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, honest_swarm.initial_peers, request_timeout=60, ban_seconds=3600
        ) as model:
            wait_for_route(model, liar.peer_id)
            ids = prompt(4)
            with model.inference_session(max_length=64) as session:
                output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
                assert not session.push and session.failovers == 1
                assert liar.peer_id not in [peer for peer, _, _ in session.chain]
            assert liar.peer_id in model.remote.bans.banned() and not model.convicted
        assert torch.equal(output, ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False))
    finally:
        liar.stop()


@pytest.mark.slow
def test_checks_prefer_servers_of_another_owner(model6, honest_swarm):
    """A wrong server's sibling (same announced owner) is the fastest other server of its blocks, but
    the check goes to another owner's servers."""
    liar = honest_swarm.add_server(
        0, 6, "--throughput", "10000", "--public-name", "mallory", module="tests.helpers.lying_server"
    )
    # Slower than the liar by 10 ms of announced compute (more than loopback pings differ by, so that
    # routing settles on the liar), yet far faster than the honest two-hop chain (2 s of compute).
    sibling = honest_swarm.add_server(
        0,
        6,
        "--throughput",
        "100",
        "--public-name",
        "mallory",
        module="tests.helpers.lying_server",
        env={"LYING_SERVER_SEED": "1"},
    )
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, honest_swarm.initial_peers, request_timeout=60, verify=1.0
        ) as model:
            wait_for_route(model, liar.peer_id)
            model.generate(prompt(4), max_new_tokens=4)
            evidence = model.convicted[liar.peer_id]
            assert sibling.peer_id not in evidence.verifier_id and evidence.verifier_id
    finally:
        liar.stop()
        sibling.stop()


def computed_tokens(server) -> float:
    """Positions a server has computed, by its own /metrics (prefill and decode)."""
    return sum(
        sum(scrape(server.metrics_url, name).values()) for name in ("prompt_tokens_total", "generation_tokens_total")
    )


@pytest.mark.slow
def test_check_traffic_grows_linearly_with_the_session(tmp_path):
    """Every step of a 2 000-position session is checked by another server, which keeps a session of its
    own for the span: it computes each position once (a stateless check of the whole history at every
    step would be 41 000 positions), and after a rewind only the positions sent again."""
    long = make_random_checkpoint(tmp_path / "llama-long", "llama", num_layers=2, max_position_embeddings=4096, seed=9)
    steps, width = 40, 50
    with LocalSwarm(long, [], workdir=tmp_path / "swarm") as swarm:
        fast = swarm.add_server(0, 2, "--throughput", "1000")
        checker = swarm.add_server(0, 2, "--throughput", "10")
        with AutoDistributedModelForCausalLM.from_pretrained(
            long, swarm.initial_peers, request_timeout=60, verify=1.0
        ) as model:
            wait_for_route(model, fast.peer_id)
            hidden = torch.randn(
                1, steps * width + width, model.config.hidden_size, generator=torch.Generator().manual_seed(0)
            )
            with model.inference_session(max_length=steps * width + width) as session:
                for step in range(steps):
                    session.step(hidden[:, step * width : (step + 1) * width])
                    assert session.settle() is None  # every position checked before the next step
                assert session.chain == [(fast.peer_id, 0, 2)]
                assert session.spans[0].verified == steps * width
                checked = computed_tokens(checker)
                assert steps * width <= checked <= 2 * steps * width, checked

                session.rewind(steps * width - width)
                session.step(hidden[:, steps * width : (steps + 1) * width])
                assert session.settle() is None
                assert session.spans[0].verified == steps * width
                assert computed_tokens(checker) - checked <= 2 * width
            verifier = model.remote.audit.verifier
            assert verifier.disputes == 0 and not model.convicted
