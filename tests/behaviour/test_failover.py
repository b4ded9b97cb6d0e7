"""Failover: a server that dies, hangs, errs or lies mid-generation is replaced and the output is unchanged;
what cannot be replaced is a clear error, and a client's own bug bans no server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import client.span
from client import AutoDistributedModelForCausalLM, MissingBlocksError, SwarmBusyError
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt
from tests.helpers.models import wait_for_route
from tests.helpers.streamers import AtToken

pytestmark = pytest.mark.slow


NEW_TOKENS = 40


OVERLAPPING = [(0, 3), (3, 6), (0, 4), (2, 6)]


def start_swarm(path, splits, tmp_path, *server_args):
    return LocalSwarm(path, splits, server_args=["--throughput", "100", *server_args], workdir=tmp_path / "swarm")


def generate_with_fault(model, ids, fault, at=20, max_new_tokens=NEW_TOKENS):
    """Greedy generation during which `fault(session)` hits the server of the chain's last span."""
    with model.inference_session(max_length=ids.shape[1] + max_new_tokens) as session:
        victims = []

        def act():
            victims.append(session.chain[-1][0])
            fault(victims[-1])

        output = model.generate(ids, max_new_tokens=max_new_tokens, session=session, streamer=AtToken(at, act))
        return output, session, victims[0]


def wait_for_state(model, peer_id: str, state: str, timeout: float = 180) -> None:
    """Polls the DHT until `peer_id` announces `state` (a generous bound: slow days are slow)."""
    deadline = time.monotonic() + timeout
    remote = model.remote
    while True:
        servers = remote.runtime.run(remote.dht.fetch_servers(model.model_name, remote.num_blocks), 30)
        if any(peer_id in block and block[peer_id].record.state.value == state for block in servers):
            return
        assert time.monotonic() < deadline, f"{peer_id} did not announce {state!r} in {timeout:.0f} s"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_server_dies_or_hangs_mid_generation_output_unchanged(model6, ref6, tmp_path, how):
    ids = prompt(1)
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with start_swarm(model6, OVERLAPPING, tmp_path) as swarm:
        # A hung server is noticed only by its timeout: short for SIGSTOP, generous otherwise.
        timeout = 5 if how == "sigstop" else 60
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=timeout
        ) as model:

            def fault(peer):
                if how == "sigkill":
                    swarm.server(peer).kill()
                else:
                    swarm.server(peer).signal(signal.SIGSTOP)

            output, session, victim = generate_with_fault(model, ids, fault)
            assert torch.equal(output, expected)
            assert session.failovers >= 1 and victim not in [peer for peer, _, _ in session.chain]
            # A new generation right away routes around the dead server (its DHT record is still "online").
            assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS), expected)


def test_server_that_starts_answering_errors_is_replaced(model6, ref6, tmp_path):
    ids = prompt(2)
    expected = ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    with start_swarm(model6, [(0, 3), (3, 6)], tmp_path) as swarm:
        faulty = swarm.add_server(
            0, 6, "--throughput", "10000", module="tests.helpers.faulty_server", env={"FAULTY_SERVER_FAIL_AFTER": "15"}
        )
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            with model.inference_session(max_length=64) as session:
                output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
                assert session.failovers == 1
                assert [start for _, start, _ in session.chain] == [0, 3]
                assert faulty.peer_id not in [peer for peer, _, _ in session.chain]
            assert torch.equal(output, expected)
        assert "illegal memory access" in faulty.log_path.read_text()


@pytest.mark.parametrize("mode", ["nan", "dtype"])
def test_a_server_replying_garbage_is_banned_and_replaced(model6, ref6, tmp_path, mode):
    """Replies that parse but are wrong (non-finite values, another dtype) are the server's failure."""
    ids = prompt(8)
    expected = ref6.generate(ids, max_new_tokens=12, do_sample=False)
    with start_swarm(model6, [(0, 3), (3, 6)], tmp_path) as swarm:
        faulty = swarm.add_server(
            0,
            6,
            "--throughput",
            "10000",
            module="tests.helpers.faulty_server",
            env={"FAULTY_SERVER_FAIL_AFTER": "3", "FAULTY_SERVER_MODE": mode},
        )
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, ban_seconds=3600
        ) as model:
            with model.inference_session(max_length=32) as session:
                assert session.failovers == 0
                output = model.generate(ids, max_new_tokens=12, session=session)
                assert session.failovers == 1 and faulty.peer_id not in [peer for peer, _, _ in session.chain]
            assert faulty.peer_id in model.remote.bans.banned()
    assert torch.equal(output, expected)


@pytest.mark.parametrize("fail_after", [0, 3], ids=["prefill", "decode"])
def test_a_step_failing_in_the_second_span_breaks_the_session_clearly(model6, tmp_path, fail_after):
    """The first span has taken the step's tokens, the second fails and has no replacement: resending the
    tokens would duplicate them upstream, so the session refuses every later call with a clear error."""
    from client import SwarmError

    with start_swarm(model6, [(0, 3)], tmp_path) as swarm:
        swarm.add_server(
            3,
            6,
            "--throughput",
            "100",
            module="tests.helpers.faulty_server",
            env={"FAULTY_SERVER_FAIL_AFTER": str(fail_after)},
        )
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, max_retries=1, ban_seconds=3600
        ) as model:
            with model.inference_session(max_length=32) as session:
                with pytest.raises(SwarmError) as first:
                    model.generate(prompt(9), max_new_tokens=6, session=session)
                assert not isinstance(first.value, SwarmBusyError)
                assert session.position == (0 if fail_after == 0 else prompt(9).shape[1] + fail_after - 1)
                with pytest.raises(SwarmError, match="session is broken by an earlier failed step"):
                    model.generate(None, max_new_tokens=1, session=session)


def test_only_server_of_some_blocks_dies_gives_a_clear_error(model6, tmp_path):
    with start_swarm(model6, [(0, 3), (3, 6)], tmp_path) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            with pytest.raises(MissingBlocksError, match=r"block\(s\) 3-5") as info:
                generate_with_fault(model, prompt(3), lambda peer: swarm.server(peer).kill(), at=5)
            assert info.value.blocks == [3, 4, 5]


def test_full_server_sends_sessions_elsewhere_then_swarm_busy(model6, ref6, tmp_path):
    ids = prompt(4)
    expected = ref6.generate(ids, max_new_tokens=20, do_sample=False)
    max_length = ids.shape[1] + 20
    with start_swarm(model6, [(0, 6), (0, 6)], tmp_path, "--cache-tokens", str(max_length + 10)) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            first, second = model.inference_session(max_length), model.inference_session(max_length)
            with first, second:
                assert torch.equal(model.generate(ids, max_new_tokens=20, session=first), expected)
                assert torch.equal(model.generate(ids, max_new_tokens=20, session=second), expected)
                assert {first.chain[0][0], second.chain[0][0]} == {s.peer_id for s in swarm.servers}
                with pytest.raises(SwarmBusyError, match="swarm busy"):
                    model.generate(ids, max_new_tokens=20)
            # Closing the sessions frees the room again.
            assert torch.equal(model.generate(ids, max_new_tokens=20), expected)


def test_drain_hands_open_sessions_over_and_sends_new_ones_elsewhere(model6, ref6, tmp_path):
    ids = prompt(5)
    expected = ref6.generate(ids, max_new_tokens=30, do_sample=False)
    with start_swarm(model6, [(0, 6), (0, 6)], tmp_path, "--drain-timeout", "60") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            with model.inference_session(max_length=64) as session:
                model.generate(ids, max_new_tokens=10, session=session)
                draining = swarm.server(session.chain[0][0])
                draining.signal(signal.SIGTERM)
                # The idle session goes to the other server with its cache: nothing keeps this one.
                assert draining.proc.wait(60) == 0
                with model.inference_session(max_length=64) as newcomer:
                    assert torch.equal(model.generate(ids, max_new_tokens=30, session=newcomer), expected)
                    assert newcomer.chain[0][0] != draining.peer_id
                output = model.generate(None, max_new_tokens=20, session=session)
                assert torch.equal(output, expected)
                assert (session.failovers, session.replayed_tokens, session.moves) == (0, 0, 1)


def test_drain_lets_sessions_no_other_server_can_take_finish_there(model6, ref6, tmp_path):
    ids = prompt(5)
    expected = ref6.generate(ids, max_new_tokens=30, do_sample=False)
    with start_swarm(model6, [(0, 6)], tmp_path, "--drain-timeout", "60") as swarm:
        # The other server takes sessions of 40 tokens at most: not the open one, of 64.
        swarm.add_server(0, 6, "--max-length", "40", "--throughput", "100")
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            with model.inference_session(max_length=64) as session:
                model.generate(ids, max_new_tokens=10, session=session)
                draining = swarm.server(session.chain[0][0])
                draining.signal(signal.SIGTERM)
                wait_for_state(model, draining.peer_id, "draining")
                with model.inference_session(max_length=40) as newcomer:
                    assert torch.equal(model.generate(ids, max_new_tokens=30, session=newcomer), expected)
                    assert newcomer.chain[0][0] != draining.peer_id
                output = model.generate(None, max_new_tokens=20, session=session)
                assert torch.equal(output, expected) and session.failovers == 0 and session.moves == 0
                assert draining.proc.poll() is None  # still serving the open session
            assert draining.proc.wait(30) == 0  # exits once the session is closed


def test_a_server_that_comes_during_a_drain_takes_the_session_then(model6, ref6, tmp_path):
    ids = prompt(5)
    expected = ref6.generate(ids, max_new_tokens=30, do_sample=False)
    with start_swarm(model6, [(0, 6)], tmp_path, "--drain-timeout", "150") as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=60) as model:
            with model.inference_session(max_length=64) as session:
                model.generate(ids, max_new_tokens=10, session=session)
                draining = swarm.servers[0]
                draining.signal(signal.SIGTERM)
                wait_for_state(model, draining.peer_id, "draining")
                # Nobody could take the session when the drain began; a server that comes now can.
                swarm.add_server(0, 6, "--throughput", "100")
                assert draining.proc.wait(150) == 0
                output = model.generate(None, max_new_tokens=20, session=session)
                assert torch.equal(output, expected)
                assert (session.failovers, session.replayed_tokens, session.moves) == (0, 0, 1)
        assert "draining: handed 1 of 1 open session(s)" in draining.log_path.read_text()


def test_sixteen_concurrent_sessions_from_several_processes(llama_swarm, llama_path, llama_ref):
    seeds = list(range(100, 116))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.client_worker",
                str(llama_path),
                llama_swarm.initial_peers[0],
                "16",
                *map(str, seeds[i::2]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = {}
    for i, worker in enumerate(workers):
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        results.update(zip(seeds[i::2], json.loads(out)))
    for seed in seeds:
        ids = prompt(seed)
        expected = llama_ref.generate(ids, max_new_tokens=16, do_sample=False)
        assert results[seed] == expected[0].tolist()


def test_retries_are_bounded_with_a_clear_error(model6, tmp_path):
    """One failure budget per step: the failure of the chosen server and those of the replacements
    whose cache replay fails count together (nested retries once made it (retries + 1)²)."""
    from client import RetriesExhaustedError

    with LocalSwarm(model6, [], workdir=tmp_path / "swarm") as swarm:
        first = swarm.add_server(
            0,
            6,
            "--throughput",
            "10000",
            module="tests.helpers.faulty_server",
            env={"FAULTY_SERVER_FAIL_AFTER": "2"},
            wait=False,
        )  # fails the second new token
        for _ in range(2):
            swarm.add_server(
                0,
                6,
                "--throughput",
                "100",
                module="tests.helpers.faulty_server",
                env={"FAULTY_SERVER_FAIL_AFTER": "0"},
                wait=False,
            )  # fail the replay
        for child in swarm.servers:
            swarm.wait_online(child)
        # No spot checks: a check sent to one of the failing servers would ban it too, and this test
        # counts the bans of the step's own failures.
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=30, max_retries=1, ban_seconds=3600, verify=0
        ) as model:
            # The chain starts at `first` (on a loaded machine a just-started server may be routed
            # around for a moment: a failing one first would add a ban of the first step's own).
            wait_for_route(model, first.peer_id)
            with pytest.raises(RetriesExhaustedError, match="gave up after 2 server failures.*illegal memory access"):
                model.generate(prompt(6), max_new_tokens=5)
            banned = model.remote.bans.banned()
            assert len(banned) == 2 and first.peer_id in banned


def test_a_step_has_one_deadline_however_long_each_wait_may_be(model6, tmp_path):
    from client import StepTimeoutError, SwarmError

    with start_swarm(model6, [(0, 6)], tmp_path) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=3600, step_timeout=2, ban_seconds=3600
        ) as model:
            with model.inference_session(max_length=32) as session:
                model.generate(prompt(6), max_new_tokens=2, session=session)
                swarm.servers[0].signal(signal.SIGSTOP)  # hung: it would never reply within request_timeout
                with pytest.raises(StepTimeoutError, match="step_timeout=2 s"):
                    model.generate(None, max_new_tokens=1, session=session)
                with pytest.raises(SwarmError, match="broken"):
                    model.generate(None, max_new_tokens=1, session=session)
            with pytest.raises(StepTimeoutError, match="forward pass"):
                model(prompt(6))
            assert model.remote.bans.banned() == set()  # a deadline names nobody at fault


def test_a_server_silent_at_ping_time_is_not_banned_and_stays_routable(model6, ref6, tmp_path):
    """A loaded machine can be slow to answer its first ping: that alone must not hide the only
    server of some blocks (a hung server is still caught by its session's own timeout)."""
    ids = prompt(2)
    with start_swarm(model6, [(0, 6)], tmp_path) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, request_timeout=2) as model:
            remote = model.remote
            only = swarm.servers[0]
            only.signal(signal.SIGSTOP)  # its daemon accepts the dial; the server itself cannot answer
            try:
                chain = remote.runtime.run(remote.make_chain(), 60)
            finally:
                only.signal(signal.SIGCONT)
            assert [plan.peer_id for plan in chain] == [only.peer_id]
            assert remote.bans.banned() == set()
            assert remote.pings.route_rtts()[only.peer_id] == remote.pings.timeout
            assert only.peer_id not in remote.pings.rtts()  # no made-up measurement
            assert torch.equal(
                model.generate(ids, max_new_tokens=NEW_TOKENS),
                ref6.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
            )


def test_stateless_forward_reroutes_around_a_failing_server(model6, ref6, tmp_path):
    ids = prompt(7)
    with start_swarm(model6, [(0, 3), (3, 6)], tmp_path) as swarm:
        swarm.add_server(
            0, 6, "--throughput", "10000", module="tests.helpers.faulty_server", env={"FAULTY_SERVER_FAIL_AFTER": "0"}
        )
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, ban_seconds=3600
        ) as model:
            logits = model(ids).logits
            assert len(model.remote.bans.banned()) == 1
    with torch.no_grad():
        torch.testing.assert_close(logits, ref6(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_stateless_forward_whose_first_message_is_lost_is_sent_again_and_bans_nobody(model6, ref6, tmp_path):
    """The only server of the blocks loses the first forward stream's message: the client times out,
    sends the forward once more on a fresh stream, and gets the right answer from the same server."""
    ids = prompt(7)
    with start_swarm(model6, [], tmp_path) as swarm:
        swarm.add_server(0, 6, module="tests.helpers.lossy_server")
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=5, ban_seconds=3600
        ) as model:
            logits = model(ids).logits
            assert not model.remote.bans.banned()
    with torch.no_grad():
        torch.testing.assert_close(logits, ref6(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_failed_prefill_is_resent_within_the_replacements_chunk_limit(model6, ref6, tmp_path):
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(9))
    expected = ref6.generate(ids, max_new_tokens=12, do_sample=False)
    with start_swarm(model6, [], tmp_path) as swarm:
        faulty = swarm.add_server(
            0, 6, "--throughput", "10000", module="tests.helpers.faulty_server", env={"FAULTY_SERVER_FAIL_AFTER": "0"}
        )  # fails the 9-token prefill
        spare = swarm.add_server(0, 6, "--throughput", "1", "--max-chunk-tokens", "2")
        with AutoDistributedModelForCausalLM.from_pretrained(
            model6, swarm.initial_peers, request_timeout=60, ban_seconds=3600
        ) as model:
            with model.inference_session(max_length=32) as session:
                output = model.generate(ids, max_new_tokens=12, session=session)
                assert session.failovers == 1 and session.chain == [(spare.peer_id, 0, 6)]
            assert faulty.peer_id in model.remote.bans.banned()
    assert torch.equal(output, expected)


def test_a_bug_in_the_client_bans_no_server(llama_client, llama_ref, monkeypatch):
    """A local exception in the middle of a step propagates at once; no server is banned for it."""
    ids = prompt(3)

    def broken_pack(*args, **kwargs):
        raise RuntimeError("a bug in the client")

    with monkeypatch.context() as patch:
        patch.setattr(client.span, "pack", broken_pack)
        with pytest.raises(RuntimeError, match="a bug in the client"):
            llama_client.generate(ids, max_new_tokens=3)
    assert llama_client.remote.bans.banned() == set()
    assert torch.equal(
        llama_client.generate(ids, max_new_tokens=5), llama_ref.generate(ids, max_new_tokens=5, do_sample=False)
    )
