"""The relay turns evidence into reputation: it re-checks a client's evidence (the server's signed
receipts, then its own recomputation) before it counts; a false accusation costs the accuser."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from client.reliability import RelayScores
from dht.ports import free_port
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt
from tests.helpers.models import wait_for_route
from tests.helpers.relay_process import RelayProcess, http, wait_until
from verification.evidence import Evidence, evidence_body

pytestmark = pytest.mark.slow

ADMIN = "evidence-admin-token"
KEYS = ("accuser-key", "client-key", "other-key")
JOIN = "evidence-join"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def workers_by_peer(relay: RelayProcess) -> dict[str, dict]:
    status, body, _ = http("GET", f"{relay.api}/v1/workers?perPage=100", headers=ADMIN_H)
    assert status == 200, body
    result = {}
    for item in body["items"]:
        detail = http("GET", f"{relay.api}/api/v1/workers/{item['id']}", headers=ADMIN_H)[1]
        result[detail["peer_id"]] = detail
    return result


@pytest.fixture(scope="module")
def relay_swarm(llama_path, tmp_path_factory):
    """Honest servers [0:2] and [2:4] registered with a relay that serves the same model."""
    workdir = tmp_path_factory.mktemp("evidence")
    swarm = LocalSwarm(llama_path, [], server_args=["--throughput", "100"], workdir=workdir)
    relay = RelayProcess(
        workdir,
        [
            "--db",
            f"sqlite:///{workdir / 'relay.db'}",
            "--admin-token",
            ADMIN,
            "--api-keys",
            ",".join(KEYS),
            "--join-token",
            JOIN,
            "--models",
            str(llama_path),
            "--refresh-period",
            "1",
        ],
        api_port=free_port(),
    )
    try:
        swarm.start()
        relay.args[:0] = ["--initial-peers", *swarm.initial_peers]
        relay.start()
        for start, end in ((0, 2), (2, 4)):
            swarm.add_server(
                start, end, "--relay", relay.api, "--relay-join-token", JOIN, "--relay-heartbeat-period", "1"
            )
        wait_until(lambda: len(workers_by_peer(relay)) == 2, 120, what="2 workers registered")
        yield swarm, relay
    finally:
        relay.stop()
        swarm.stop()


def test_a_forged_accusation_is_rejected_and_costs_the_accuser(relay_swarm, llama_path):
    swarm, relay = relay_swarm
    honest = swarm.servers[0]
    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, swarm.initial_peers, request_timeout=60, verify=1.0
    ) as model:
        with model.inference_session(max_length=32) as session:
            model.generate(prompt(1), max_new_tokens=6, session=session)
            span = session.spans[0]
            assert span.plan.peer_id == honest.peer_id and len(span.receipts) >= 6
            inputs, outputs = span.history(), span.outputs()
            genuine = Evidence(
                peer_id=honest.peer_id,
                start_block=span.plan.start,
                end_block=span.plan.end,
                positions=(0, inputs.shape[1]),
                input_digest="",
                claimed_digest="",
                verifier_id="",
                verifier_digest="",
                referee="",
                referee_digest="",
                claimed_error=1.0,
                verifier_error=0.0,
                tolerance=0.0,
                model=model.model_name,
                session_id=span.key,
                dtype="float32",
                receipts=tuple(span.receipts),
                inputs=inputs,
                outputs=outputs,
            )
    url, key = f"{relay.api}/api/v1/evidence", {"X-API-Key": KEYS[0]}

    # 1. The server's real, signed outputs: the relay recomputes them and finds them right.
    status, body, _ = http("POST", url, evidence_body(genuine), key)
    assert status == 422 and "agree with the relay's recomputation" in body["error"]["message"], body
    # 2. Made-up outputs: the server never signed them.
    tampered = dataclasses.replace(genuine, outputs=outputs + 0.5)
    status, body, _ = http("POST", url, evidence_body(tampered), key)
    assert status == 422 and "not what the server signed" in body["error"]["message"], body
    # 3. Made-up outputs with receipts re-digested to match: the signature no longer does.
    forged = tuple(dataclasses.replace(r, output_digest="0" * 64) if i == 0 else r for i, r in enumerate(span.receipts))
    status, body, _ = http("POST", url, evidence_body(dataclasses.replace(genuine, receipts=forged)), key)
    assert status == 422 and "not signed by the server" in body["error"]["message"], body
    # Three false accusations: this key is not heard any more; another key still is.
    status, body, _ = http("POST", url, evidence_body(genuine), key)
    assert status == 403 and "false accusations" in body["error"]["message"], body
    status, body, _ = http("POST", url, evidence_body(genuine), {"X-API-Key": KEYS[2]})
    assert status == 422, body
    # 4. The genuine receipts and outputs with another attention mask, under which the relay's
    # recomputation would disagree: the server signed the mask it attended with, so this does not hold.
    masked = torch.ones(inputs.shape[:2], dtype=torch.int64)
    masked[:, 0] = 0
    status, body, _ = http(
        "POST", url, evidence_body(dataclasses.replace(genuine, mask=masked)), {"X-API-Key": KEYS[2]}
    )
    assert status == 422 and "not signed by the server" in body["error"]["message"], body
    # Malformed evidence is a 400 and counts against nobody; the accused's record stays clean.
    body = evidence_body(genuine)
    status, reply, _ = http("POST", url, {**body, "tensors": "not base64!"}, {"X-API-Key": KEYS[2]})
    assert status == 400 and "base64 safetensors" in reply["error"]["message"], reply
    status, reply, _ = http("POST", url, {**body, "peer_id": "QmNobody"}, {"X-API-Key": KEYS[2]})
    assert status == 404, reply
    assert workers_by_peer(relay)[honest.peer_id]["reliability"]["proven_faults"] == 0


def test_a_proven_fault_reaches_the_relay_and_sinks_the_servers_score(relay_swarm, llama_path, llama_ref):
    swarm, relay = relay_swarm
    liar = swarm.add_server(
        0,
        4,
        "--throughput",
        "10000",
        "--relay",
        relay.api,
        "--relay-join-token",
        JOIN,
        "--relay-heartbeat-period",
        "1",
        module="tests.helpers.lying_server",
    )
    try:
        wait_until(lambda: liar.peer_id in workers_by_peer(relay), 120, what="the liar registered")
        scores = RelayScores(relay.api, KEYS[1])
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=60, verify=1.0, reliability=scores
        ) as model:
            ids = prompt(2)
            output = model.generate(ids, max_new_tokens=8)
            assert liar.peer_id in model.convicted
            wait_until(
                lambda: workers_by_peer(relay)[liar.peer_id]["reliability"]["proven_faults"] == 1,
                120,
                what="the relay confirming the fault",
            )
            # The same evidence again, from another key: confirmed, but counted once.
            status, body, _ = http(
                "POST",
                f"{relay.api}/api/v1/evidence",
                evidence_body(model.convicted[liar.peer_id]),
                {"X-API-Key": KEYS[2]},
            )
            assert status == 201 and body["confirmed"] and body["already_known"] and body["proven_faults"] == 1, body
        assert torch.equal(output, llama_ref.generate(ids, max_new_tokens=8, do_sample=False))
        reply = http("GET", f"{relay.api}/api/v1/reliability", headers={"X-API-Key": KEYS[1]})[1]
        score = {item["peer_id"]: item["score"] for item in reply["data"]}
        honest = [server.peer_id for server in swarm.servers[:2]]
        # One proven fault divides the score by ten: far below any honest server's.
        assert score[liar.peer_id] < 0.1 and all(score[peer] > 5 * score[liar.peer_id] for peer in honest)
    finally:
        liar.stop()


def test_one_session_proves_at_most_one_fault_per_server_whatever_stretch_is_sent(relay_swarm, llama_path):
    """Evidence of several wrong steps can be cut at any step boundary; each cut is the same session."""
    swarm, relay = relay_swarm
    liar = swarm.add_server(
        0,
        4,
        "--throughput",
        "10000",
        "--relay",
        relay.api,
        "--relay-join-token",
        JOIN,
        "--relay-heartbeat-period",
        "1",
        module="tests.helpers.lying_server",
        env={"LYING_SERVER_AFTER": "1"},  # its first step (which the first check covers) is right
    )
    try:
        wait_until(lambda: liar.peer_id in workers_by_peer(relay), 120, what="the liar registered")
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path,
            swarm.initial_peers,
            request_timeout=60,
            verify=1e-9,  # the first check only, in effect
        ) as model:
            wait_for_route(model, liar.peer_id)
            # Its first step is checked at once; the others only when generate() settles before it returns:
            # all wrong, in one claim.
            model.generate(prompt(3), max_new_tokens=6)
            evidence = model.convicted[liar.peer_id]
        first, end = evidence.positions
        cuts = sorted(r.position for r in evidence.receipts if first <= r.position < end)
        assert len(cuts) >= 3, evidence.positions
        url = f"{relay.api}/api/v1/evidence"
        verdicts = []
        for cut, key in zip(cuts, itertools.cycle(KEYS[1:])):  # the first key made its 3 false accusations
            stretch = dataclasses.replace(evidence, positions=(cut, end), outputs=evidence.outputs[:, cut - first :])
            status, body, _ = http("POST", url, evidence_body(stretch), {"X-API-Key": key})
            assert status == 201 and body["confirmed"], body
            verdicts.append((body["already_known"], body["proven_faults"]))
        assert verdicts == [(False, 1)] + [(True, 1)] * (len(verdicts) - 1)
    finally:
        liar.stop()


def test_the_relays_canaries_catch_a_wrong_server_and_spare_honest_ones(relay_swarm, llama_path, tmp_path):
    swarm, _ = relay_swarm
    liar = swarm.add_server(0, 2, "--throughput", "100", module="tests.helpers.lying_server")
    canary_relay = RelayProcess(
        tmp_path,
        [
            "--initial-peers",
            *swarm.initial_peers,
            "--db",
            f"sqlite:///{tmp_path / 'canary.db'}",
            "--admin-token",
            ADMIN,
            "--api-keys",
            KEYS[0],
            "--models",
            str(llama_path),
            "--refresh-period",
            "1",
            "--verify-rate",
            "1",
        ],
        name="canary-relay",
    )
    try:
        canary_relay.start()

        def faults() -> list[dict]:
            status, body, _ = http("GET", f"{canary_relay.api}/api/v1/faults", headers=ADMIN_H)
            assert status == 200, body
            return body["data"]

        found = wait_until(
            lambda: [f for f in faults() if f["peer_id"] == liar.peer_id], 120, what="a canary catching the liar"
        )
        assert found[0]["accuser"] == "relay" and found[0]["evidence"]["canary"] is True
        assert found[0]["relative_error"] > found[0]["tolerance"]
        # The honest servers got canaries too (the relay logs each), and not one of them was accused.
        honest = [server.peer_id for server in swarm.servers[:2]]  # the fixture's own servers
        log = canary_relay.child.log_path
        wait_until(
            lambda: all(f"canary to {peer}" in log.read_text() for peer in honest),
            120,
            what="canaries to every honest server",
        )
        assert {f["peer_id"] for f in faults()} == {liar.peer_id}
        assert http("GET", f"{canary_relay.api}/api/v1/faults")[0] == 401  # operators only
    finally:
        canary_relay.stop()
        liar.stop()
