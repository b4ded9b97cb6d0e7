"""The relay against a live swarm on 127.0.0.1: three real servers registered with `--relay`, a real
`python -m relay` process, the `openai` package as the API client."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import torch
from transformers import AutoTokenizer

from client import AutoDistributedModelForCausalLM
from client.reliability import RelayScores
from dht.ports import free_port
from harness.local_swarm import LocalSwarm
from protocol.worker_auth import signature_headers
from relay.observability import SCRAPE_MAX_AGE
from swarm.relay_link import RelayLink
from tests.helpers.metrics import scrape, values
from tests.helpers.relay_process import RelayProcess, http, signed_registration, wait_until

pytestmark = pytest.mark.slow

ADMIN = "test-admin-token"
KEYS = ("key-one", "key-two")
JOIN = "join-secret"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
KEY_H = {"X-API-Key": KEYS[1]}
GPUSTACK_ITEM_KEYS = {
    "id",
    "name",
    "hostname",
    "ip",
    "port",
    "labels",
    "system_reserved",
    "state",
    "state_message",
    "status",
    "unreachable",
    "heartbeat_time",
    "created_at",
    "updated_at",
}
STATUS_KEYS = {"cpu", "memory", "swap", "filesystem", "os", "kernel", "uptime", "gpu_devices", "rpc_servers"}


def workers(relay: RelayProcess, per_page: int = 100) -> list[dict]:
    status, body, _ = http("GET", f"{relay.api}/v1/workers?perPage={per_page}", headers=ADMIN_H)
    assert status == 200, body
    return body["items"]


@pytest.fixture(scope="module")
def relay_swarm(llama_path, tmp_path_factory):
    """Servers [0:2], [0:2], [2:4] registered with a relay that requires a join token."""
    workdir = tmp_path_factory.mktemp("relay")
    swarm = LocalSwarm(llama_path, [], server_args=["--throughput", "100", "--max-length", "48"], workdir=workdir)
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
            "--heartbeat-timeout",
            "20",
            "--refresh-period",
            "1",
        ],
        api_port=free_port(),
    )
    try:
        swarm.start()
        relay.args[:0] = ["--initial-peers", *swarm.initial_peers]
        relay.start()
        for start, end in ((0, 2), (0, 2), (2, 4)):
            swarm.add_server(
                start,
                end,
                "--relay",
                relay.api,
                "--relay-join-token",
                JOIN,
                "--relay-heartbeat-period",
                "1",
                wait=False,
            )
        for server in swarm.servers:
            swarm.wait_online(server)
        wait_until(lambda: sum(w["state"] == "ready" for w in workers(relay)) == 3, 180, what="3 workers ready")
        name = http("GET", f"{relay.api}/v1/models", headers=KEY_H)[1]["data"][0]["id"]
        wait_until(
            lambda: http("GET", f"{relay.mgmt}/v2/models/{name}/ready")[0] == 200,
            180,
            what="the relay seeing every block of the model served",
        )
        yield swarm, relay
    finally:
        relay.stop()
        swarm.stop()


@pytest.fixture(scope="module")
def relay(relay_swarm) -> RelayProcess:
    return relay_swarm[1]


@pytest.fixture(scope="module")
def model_name(relay) -> str:
    status, body, _ = http("GET", f"{relay.api}/v1/models", headers=KEY_H)
    assert status == 200
    return body["data"][0]["id"]


@pytest.fixture(scope="module")
def tokenizer(llama_path):
    return AutoTokenizer.from_pretrained(llama_path)


def reference_text(llama_ref, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = llama_ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def openai_client(relay: RelayProcess, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay.api}/v1", api_key=key, max_retries=0, timeout=120)


# ---- probes and service info ----------------------------------------------------------------------


def test_probes_and_service_info(relay, model_name):
    assert http("GET", f"{relay.mgmt}/startup")[:2] == (200, {"status": "ok", "message": "Coordinator is starting up"})
    assert http("GET", f"{relay.mgmt}/liveness")[:2] == (200, {"status": "ok", "message": "Coordinator is alive"})
    assert http("GET", f"{relay.mgmt}/readiness")[:2] == (
        200,
        {"status": "ok", "message": "Coordinator is ok", "ready": True},
    )
    for path in (
        "/v1/startup",
        "/v1/health",
        "/v1/readiness",
        "/v2/health/live",
        "/v2/health/ready",
        f"/v2/models/{model_name}/ready",
    ):
        status, body, _ = http("GET", relay.mgmt + path)
        assert (status, body) == (200, None), path
    assert http("GET", f"{relay.mgmt}/v2/models/no-such-model/ready")[0] == 404

    status, info, _ = http("GET", relay.mgmt + "/")
    assert status == 200
    assert set(info) == {"service", "version", "description", "endpoints", "timestamp"}
    assert {"GET /liveness", "GET /startup", "GET /readiness", "POST /instances/refresh"} <= set(info["endpoints"])
    dt.datetime.fromisoformat(info["timestamp"])


def test_standby_answers_readiness_503_and_recvs_info(relay, model_name):
    assert http("POST", f"{relay.mgmt}/backup_info", {"is_master": False, "is_abnormal": False})[0] == 401
    try:
        status, body, _ = http("POST", f"{relay.mgmt}/backup_info", {"is_master": False, "is_abnormal": False}, ADMIN_H)
        assert (status, body) == (200, {"update_successfully": True})
        assert http("GET", f"{relay.mgmt}/readiness")[:2] == (
            503,
            {"status": "error", "message": "Coordinator is not master", "ready": False},
        )
        assert http("GET", f"{relay.mgmt}/v1/readiness")[0] == 503
        assert http("GET", f"{relay.mgmt}/v2/health/ready")[0] == 503
        assert http("GET", f"{relay.mgmt}/liveness")[0] == 200
        status, body, _ = http("GET", f"{relay.mgmt}/recvs_info")
        assert status == 200 and body["is_master"] is False and isinstance(body["recv_flow"], int)
    finally:
        http("POST", f"{relay.mgmt}/backup_info", {"is_master": True, "is_abnormal": False}, ADMIN_H)
    assert http("GET", f"{relay.mgmt}/readiness")[0] == 200
    for _ in range(2):  # inference requests count; heartbeats and status reads do not
        http("POST", f"{relay.api}/v1/completions", {"model": model_name, "prompt": "a", "max_tokens": 1}, KEY_H)
        http("GET", f"{relay.api}/v1/models", headers=KEY_H)
    assert http("GET", f"{relay.mgmt}/recvs_info")[1] == {"is_master": True, "recv_flow": 2}


# ---- workers -------------------------------------------------------------------------------------


def test_workers_are_listed_exactly_as_gpustack_does(relay_swarm):
    swarm, relay = relay_swarm
    assert http("GET", f"{relay.api}/v1/workers")[0] == 401
    assert http("GET", f"{relay.api}/v1/workers", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body, headers = http("GET", f"{relay.api}/v1/workers", headers=ADMIN_H)
    assert status == 200
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert body["pagination"] == {"page": 1, "perPage": 10, "total": 3, "totalPage": 1}
    peers = {server.peer_id for server in swarm.servers}
    for item in body["items"]:
        assert set(item) == GPUSTACK_ITEM_KEYS
        assert item["state"] == "ready" and item["state_message"] is None and item["unreachable"] is False
        assert item["ip"] == "127.0.0.1" and 0 < item["port"] < 65536
        assert set(item["status"]) == STATUS_KEYS
        assert item["status"]["cpu"]["total"] == os.cpu_count()
        assert item["labels"]["worker-name"] == item["name"] and item["labels"]["os"] == "linux"
        assert item["system_reserved"] == {"ram": 0, "vram": 0}
        for key in ("heartbeat_time", "created_at", "updated_at"):
            assert item[key].endswith("Z")
    assert {
        http("GET", f"{relay.api}/api/v1/workers/{item['id']}", headers=ADMIN_H)[1]["peer_id"] for item in body["items"]
    } == peers

    status, page2, _ = http("GET", f"{relay.api}/v1/workers?page=2&perPage=2", headers=ADMIN_H)
    assert status == 200 and len(page2["items"]) == 1
    assert page2["pagination"] == {"page": 2, "perPage": 2, "total": 3, "totalPage": 2}
    assert http("GET", f"{relay.api}/v1/workers?page=9&perPage=100", headers=ADMIN_H)[1]["items"] == []
    for query in ("perPage=0", "perPage=101", "perPage=abc", "page=0", "page=-1", "page=1.5"):
        status, body, _ = http("GET", f"{relay.api}/v1/workers?{query}", headers=ADMIN_H)
        assert status == 400 and body["error"]["message"], query


def test_pushed_config_reaches_the_server(relay_swarm, model_name):
    """Working hours pushed to the only server of blocks 2:4 make it unavailable: the relay cannot
    serve the model until the config is pushed back."""
    swarm, relay = relay_swarm
    last = swarm.servers[2]
    worker = next(
        w
        for w in workers(relay)
        if http("GET", f"{relay.api}/api/v1/workers/{w['id']}", headers=ADMIN_H)[1]["peer_id"] == last.peer_id
    )
    path = f"{relay.api}/api/v1/workers/{worker['id']}/config"
    status, before, _ = http("GET", path, headers=ADMIN_H)
    assert status == 200 and before["config"]["acceptance_rate"] == 1.0

    now = dt.datetime.now()
    closed = f"{(now + dt.timedelta(hours=2)):%H:%M}-{(now + dt.timedelta(hours=3)):%H:%M}"
    status, pushed, _ = http("PUT", path, {"working_hours": closed}, ADMIN_H)
    assert status == 200 and pushed["config_version"] == before["config_version"] + 1

    def availability():
        state = http("GET", f"{relay.obs}/api/v1/state")[1]
        rows = [s for m in state.get("models", []) for s in m["servers"] if s["peer_id"] == last.peer_id]
        return rows and rows[0]["available"]

    wait_until(lambda: availability() is False, 180, what="server announcing itself unavailable")
    chat = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, body, _ = http("POST", f"{relay.api}/v1/chat/completions", chat, KEY_H)
    assert status == 503 and "block" in body["error"]["message"]

    assert http("PUT", path, {}, ADMIN_H)[0] == 200
    wait_until(lambda: availability() is True, 180, what="server available again")
    assert http("POST", f"{relay.api}/v1/chat/completions", chat, KEY_H)[0] == 200


# ---- the OpenAI-compatible API --------------------------------------------------------------------


def test_chat_completions_match_transformers(relay, model_name, llama_ref, tokenizer):
    client = openai_client(relay)
    assert [m.id for m in client.models.list().data] == [model_name]
    expected, count = reference_text(llama_ref, tokenizer, "user: hello\nassistant:", 12)

    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == count and reply.usage.prompt_tokens == len(
        tokenizer("user: hello\nassistant:")["input_ids"]
    )

    chunks = list(
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    with pytest.raises(openai.AuthenticationError):
        openai_client(relay, key="wrong").chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=100_000
        )
    # the model's context is 512 tokens, but these servers hold sessions of at most 48 (--max-length)
    with pytest.raises(openai.BadRequestError, match="48 tokens"):
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=60)


def test_completions_stream_and_stop_strings(relay, model_name, llama_ref, tokenizer):
    client = openai_client(relay, key=KEYS[1])
    expected, _ = reference_text(llama_ref, tokenizer, "The swarm", 20)
    reply = client.completions.create(model=model_name, prompt="The swarm", max_tokens=20, temperature=0)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model_name, prompt="The swarm", max_tokens=20, temperature=0, stream=True
        )
    )
    assert streamed == expected

    stop = expected[3:6]
    cut = expected[: expected.find(stop)]  # the first occurrence, wherever it is
    reply = client.completions.create(model=model_name, prompt="The swarm", max_tokens=20, temperature=0, stop=[stop])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model_name, prompt="The swarm", max_tokens=20, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == cut

    sampled = client.completions.create(model=model_name, prompt="The swarm", max_tokens=5, temperature=1.2, top_p=0.9)
    choice, used = sampled.choices[0], sampled.usage.completion_tokens
    assert 1 <= used <= 5 and (used == 5 or choice.finish_reason == "stop")  # sampling may draw </s> early


def test_a_repeated_prompt_is_served_from_the_servers_prefix_caches(relay_swarm, model_name, tokenizer):
    swarm, relay = relay_swarm
    words = []
    while len(tokenizer(" ".join(words))["input_ids"]) < 36:  # sessions here hold 48 tokens at most
        words.append(f"cache{len(words)}")
    body = {"model": model_name, "prompt": " ".join(words), "max_tokens": 4, "temperature": 0}

    def server_hits() -> float:
        return sum(sum(scrape(server.metrics_url, "prefix_cache_hits_total").values()) for server in swarm.servers)

    hits_before = server_hits()
    first = http("POST", f"{relay.api}/v1/completions", body, KEY_H)
    second = http("POST", f"{relay.api}/v1/completions", body, KEY_H)
    assert first[0] == second[0] == 200
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]
    assert first[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second[1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}  # two whole blocks of 16
    # Both spans of the chain served it (two servers hold blocks 0:2: the client went back to the one that had it).
    assert server_hits() - hits_before == 2 * 32
    time.sleep(SCRAPE_MAX_AGE + 0.5)  # the relay's last scrape of its servers is too old now: it scrapes again
    full = http("GET", f"{relay.obs}/metrics")[1]
    assert sum(values(full, "prefix_cache_hits_total").values()) == server_hits()
    assert sum(values(full, "npu_prefix_cache_hit_rate").values()) > 0


def test_a_request_whose_client_leaves_stops_generating(relay, model_name):
    """Non-streaming too: a client that hangs up does not keep the swarm busy for tokens nobody reads."""

    def finished() -> list[str]:
        return [line for line in relay.child.log_path.read_text().splitlines() if " new tokens (" in line]

    body = {"model": model_name, "prompt": "Leaving", "max_tokens": 40, "temperature": 0}
    status, reply, _ = http("POST", f"{relay.api}/v1/completions", body, KEY_H)
    assert status == 200 and reply["usage"]["completion_tokens"] == 40  # what the same request costs when read
    before = len(finished())
    raw = json.dumps(body).encode()
    host, port = relay.api.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {KEYS[1]}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
    # the connection is closed at once: the generation ends early, with what it had
    line = wait_until(lambda: finished()[before:], 180, what="the abandoned generation to end")[0]
    assert "+ 40 new tokens" not in line and line.endswith("(stop)")


def test_jobs_run_through_the_swarm(relay, model_name, llama_ref, tokenizer):
    expected, _ = reference_text(llama_ref, tokenizer, "user: job\nassistant:", 6)
    body = {
        "type": "llm",
        "model": model_name,
        "messages": [{"role": "user", "content": "job"}],
        "max_tokens": 6,
        "temperature": 0,
        "region": "europe-west",  # a preference: these servers announce none, and still run it
    }
    assert http("POST", f"{relay.api}/api/v1/jobs", body)[0] == 401
    status, refused, _ = http("POST", f"{relay.api}/api/v1/jobs", {**body, "region": "mars"}, KEY_H)
    assert status == 400 and "unknown region 'mars'" in refused["error"]["message"]
    status, job, _ = http("POST", f"{relay.api}/api/v1/jobs", body, KEY_H)
    assert status == 201 and job["status"] == "queued"
    done = wait_until(
        lambda: (
            (j := http("GET", f"{relay.api}/api/v1/jobs/{job['job_id']}", headers=KEY_H)[1])["status"]
            in ("completed", "failed")
            and j
        ),
        180,
        what="job finished",
    )
    assert done["status"] == "completed", done
    assert done["result"]["text"] == expected and done["result"]["usage"]["completion_tokens"] == 6
    status, stats, _ = http("GET", f"{relay.api}/api/v1/queue/stats", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert status == 200 and stats["completed"] >= 1 and stats["queued"] == 0 and stats["workers_ready"] == 3
    assert http("GET", f"{relay.api}/api/v1/jobs/0123456789abcdef", headers=KEY_H)[0] == 404


# ---- metrics -------------------------------------------------------------------------------------


def test_metrics_are_aggregated_from_every_server(relay_swarm, model_name):
    swarm, relay = relay_swarm
    body = {"model": model_name, "prompt": "metrics", "max_tokens": 3, "temperature": 0}
    assert http("POST", f"{relay.api}/v1/completions", body, KEY_H)[0] == 200
    time.sleep(SCRAPE_MAX_AGE + 0.5)  # a scrape cached before the completion is too old now: every read below sees it
    ids = {w["id"] for w in workers(relay)}
    instance = http("GET", f"{relay.obs}/metrics?type=instance")[1]
    received = values(instance, "request_received_total")
    assert {dict(labels)["instance_id"] for labels in received} == {str(i) for i in ids}
    assert {dict(labels)["role"] for labels in received} == {"mixed"}
    assert all(dict(labels)["model_name"] == model_name for labels in received)
    assert sum(received.values()) >= 2  # the completion above opened a session on two servers

    full = http("GET", f"{relay.obs}/metrics")[1]
    assert values(full, "request_received_total") == {(("model_name", model_name),): sum(received.values())}
    assert values(full, "request_failed_total")[(("model_name", model_name),)] == sum(
        values(instance, "request_failed_total").values()
    )
    assert "python_info" in full  # the relay's own process metrics come first
    buckets = values(full, "time_to_first_token_seconds_bucket")
    assert {dict(labels)["le"] for labels in buckets} >= {"0.001", "0.1", "10.0", "+Inf"}
    for name in (
        "request_success_total",
        "num_requests_running",
        "num_requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
        "cpu_cache_usage_perc",
        "npu_prefix_cache_hit_rate",
        "time_per_output_token_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_prompt_tokens_count",
        "request_generation_tokens_count",
    ):
        assert values(full, name), name

    role = http("GET", f"{relay.obs}/metrics?type=role")[1]
    assert values(role, "request_received_total") == {
        (("model_name", model_name), ("role", "mixed")): sum(received.values())
    }
    assert http("GET", f"{relay.obs}/metrics?type=role&role=prefill")[:2] == (200, None)  # no prefill-only servers
    assert http("GET", f"{relay.obs}/metrics?type=bogus")[0] == 400
    assert http("GET", f"{relay.obs}/metrics?type=full&role=decode")[0] == 400
    status, text, _ = http("GET", f"{relay.obs}/instance/metrics")
    assert status == 410 and "type=instance" in text

    line = next(out for out in swarm.servers[0].stdout if "metrics http://" in out)
    own = http("GET", line.rsplit(" ", 1)[1])[1]
    assert values(own, "request_received_total")


# ---- worker authentication -----------------------------------------------------------------------


def register(relay: RelayProcess, **extra) -> dict:
    body = signed_registration(**{"name": "manual", "relay": relay.api, **extra})
    status, reply, _ = http("POST", f"{relay.api}/api/v1/workers/register", body, {"X-Join-Token": JOIN})
    assert status == 201, reply
    return reply


def signed(
    relay: RelayProcess,
    creds: dict,
    method: str,
    path: str,
    body: dict,
    when: float | None = None,
    token: str | None = None,
) -> tuple[int, dict, dict]:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = {
        "Authorization": f"Bearer {token or creds['token']}",
        **signature_headers(creds["signing_secret"], method, path, raw, when or time.time()),
    }
    return http(method, relay.api + path, raw=raw, headers=headers)


def test_registration_needs_the_join_token_and_the_peers_own_key(relay):
    url = f"{relay.api}/api/v1/workers/register"
    body = signed_registration("x", relay.api)
    assert http("POST", url, body)[0] == 401
    assert http("POST", url, body, {"X-Join-Token": "wrong"})[0] == 401
    join = {"X-Join-Token": JOIN}
    other = signed_registration("y", relay.api)
    for forged in (
        {**body, "peer_id": other["peer_id"]},  # someone else's peer id, signed with my key
        {**body, "peer_signature": other["peer_signature"]},
        {**body, "signed_at": body["signed_at"] - 1},
        {**body, "model": "another-model"},  # the signature covers the whole body
        signed_registration("x", "http://127.0.0.1:1"),  # made for another relay
        {**signed_registration("z", relay.api, signed_at=int(time.time()) - 3600)},
    ):
        status, reply, _ = http("POST", url, forged, join)
        assert status == 401, forged
    assert http("POST", url, body, join)[0] == 201
    status, reply, _ = http("POST", url, body, join)  # the same signed registration again
    assert status == 401 and "replay" in reply["error"]["message"]
    reply = register(relay)
    assert set(reply) >= {"worker_id", "token", "refresh_token", "signing_secret", "token_expires_at"}
    expires = dt.datetime.fromisoformat(reply["token_expires_at"].replace("Z", "+00:00"))
    assert abs((expires - dt.datetime.now(dt.timezone.utc)).total_seconds() - 24 * 3600) < 120


def test_a_peer_registering_again_gets_its_row_back_with_new_credentials(relay, tmp_path):
    identity = tmp_path / "identity.key"
    first = register(relay, name="again", identity=identity)
    wid = first["worker_id"]
    path = f"/api/v1/workers/{wid}/heartbeat"
    assert signed(relay, first, "POST", path, {"status": "online"})[0] == 200
    pushed = http("PUT", f"{relay.api}/api/v1/workers/{wid}/config", {"acceptance_rate": 0.5}, ADMIN_H)[1]
    second = register(relay, name="again", identity=identity, signed_at=int(time.time()) - 1)
    assert second["worker_id"] == wid and second["config_version"] == pushed["config_version"]
    assert signed(relay, first, "POST", path, {"status": "online"})[0] == 401  # the old credentials are dead
    assert signed(relay, second, "POST", path, {"status": "online"})[0] == 200
    rows = [
        w
        for w in http("GET", f"{relay.api}/v1/workers?perPage=100", headers=ADMIN_H)[1]["items"]
        if w["name"] == "again"
    ]
    assert len(rows) == 1


def test_signed_heartbeats_refuse_forgery_replay_and_stale_requests(relay):
    creds = register(relay)
    path = f"/api/v1/workers/{creds['worker_id']}/heartbeat"
    status, reply, _ = signed(relay, creds, "POST", path, {"status": "online", "config_version": 0})
    assert status == 200 and reply["config_changed"] is True and reply["config_version"] == 1
    assert 0 <= reply["reliability_score"] <= 1

    raw = json.dumps({"status": "online", "config_version": 1}).encode()
    headers = {
        "Authorization": f"Bearer {creds['token']}",
        **signature_headers(creds["signing_secret"], "POST", path, raw, time.time()),
    }
    assert http("POST", relay.api + path, raw=raw, headers=headers)[0] == 200
    status, body, _ = http("POST", relay.api + path, raw=raw, headers=headers)  # the same request again
    assert status == 401 and "replay" in body["error"]["message"]
    status, body, _ = signed(relay, creds, "POST", path, {"status": "online"}, when=time.time() - 600)
    assert status == 401 and "X-Timestamp" in body["error"]["message"]
    tampered = {**headers, "X-Timestamp": str(time.time())}
    assert http("POST", relay.api + path, raw=raw, headers=tampered)[0] == 401
    # Requests without the worker's valid token are anyone's junk: they never lock the worker out.
    for _ in range(6):
        assert signed(relay, creds, "POST", path, {}, token="not-the-token")[0] == 401
    assert signed(relay, creds, "POST", path, {"status": "online", "config_version": 1})[0] == 200
    # Failures that present its valid token (a stolen token without the signing secret) do: the fifth
    # in a row locks it, after which even a correct request is refused.
    for _ in range(5):
        assert http("POST", relay.api + path, raw=raw, headers=tampered)[0] == 401
    status, body, _ = signed(relay, creds, "POST", path, {"status": "online", "config_version": 1})
    assert status == 423 and "locked" in body["error"]["message"]


def test_refresh_rotates_tokens(relay):
    creds = register(relay, name="rotating")
    wid = creds["worker_id"]
    refresh_path = f"/api/v1/workers/{wid}/refresh"
    status, rotated, _ = signed(relay, creds, "POST", refresh_path, {"refresh_token": creds["refresh_token"]})
    assert status == 200 and rotated["token"] != creds["token"]
    new = {**creds, **rotated}
    assert signed(relay, new, "POST", f"/api/v1/workers/{wid}/heartbeat", {"status": "joining"})[0] == 200
    detail = http("GET", f"{relay.api}/api/v1/workers/{wid}", headers=ADMIN_H)[1]
    assert (detail["state"], detail["state_message"]) == ("not_ready", "joining: loading blocks")
    assert signed(relay, creds, "POST", f"/api/v1/workers/{wid}/heartbeat", {"status": "online"})[0] == 401
    assert signed(relay, new, "POST", refresh_path, {"refresh_token": creds["refresh_token"]})[0] == 401
    status, config, _ = signed(relay, new, "GET", f"/api/v1/workers/{wid}/config", None)
    assert status == 200 and config["config_version"] == 1


# ---- reliability ---------------------------------------------------------------------------------


def test_clients_avoid_servers_with_low_reliability(relay_swarm, llama_path):
    """Reported failures lower one of the two [0:2] servers' score relative to the other; a client that
    asks the relay for scores then never routes through the lower-scoring one (and still works)."""
    swarm, relay = relay_swarm
    bad, good = swarm.servers[0].peer_id, swarm.servers[1].peer_id

    def scores() -> dict[str, float]:
        reply = http("GET", f"{relay.api}/api/v1/reliability", headers=KEY_H)[1]
        return {item["peer_id"]: item["score"] for item in reply["data"]}

    before = scores()
    for _ in range(20):
        for peer, success in ((bad, False), (good, True)):
            assert http("POST", f"{relay.api}/api/v1/reports", {"peer_id": peer, "success": success}, KEY_H)[0] == 200
    # One key can move one worker's score only so far per hour.
    status, body, headers = http("POST", f"{relay.api}/api/v1/reports", {"peer_id": bad, "success": False}, KEY_H)
    assert status == 429 and int(headers["Retry-After"]) > 0 and "20 times in the last hour" in body["error"]["message"]
    assert http("POST", f"{relay.api}/api/v1/reports", {"peer_id": "QmNobody", "success": True}, KEY_H)[0] == 404
    after = scores()
    # The reports pushed the two apart, by at most a tenth each (one key's cap); these servers served
    # the relay's earlier generations, so which of the two now scores lower depends on those.
    assert after[good] - after[bad] > before[good] - before[bad]
    low, high = sorted((bad, good), key=after.get)
    threshold = (after[low] + after[high]) / 2
    assert after[low] < threshold < after[high]

    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, swarm.initial_peers, reliability=RelayScores(relay.api, KEYS[0]), min_reliability=threshold
    ) as model:
        for _ in range(4):
            with model.inference_session(max_length=8) as session:
                model.generate(torch.tensor([[5, 6, 7]]), session=session, max_new_tokens=2)
                assert low not in {peer for peer, _, _ in session.chain}


# ---- instances ------------------------------------------------------------------------------------


def test_instances_refresh_offline_online_and_queries(relay, model_name):
    instance = {
        "job_name": "test-job",
        "model_name": "test-model",
        "id": 101,
        "role": "prefill",
        "endpoints": {"127.0.0.2": {"0": {"id": 0, "ip": "127.0.0.2", "business_port": "8080", "mgmt_port": "8081"}}},
    }
    url = f"{relay.mgmt}/instances/refresh"
    assert http("POST", url, {"event": "add", "instances": [instance]})[0] == 401
    status, body, _ = http("POST", url, {"event": "add", "instances": [instance]}, ADMIN_H)
    assert status == 200
    assert body["status"] == "success" and body["message"] == "Instance refresh completed"
    assert body["data"]["event_type"] == "add" and body["data"]["instance_count"] == 1
    assert (
        http("POST", url, {"event": "add", "instances": [{**instance, "id": 102, "role": "decode"}]}, ADMIN_H)[0] == 200
    )

    assert http("POST", f"{relay.mgmt}/v1/instances/query_tasks", {"p_id": 101, "d_id": 102}, ADMIN_H)[:2] == (
        200,
        {"is_end": True},
    )
    assert http("POST", f"{relay.mgmt}/v1/instances/query_tasks", {"p_id": 101, "d_id": 999}, ADMIN_H)[0] == 404
    assert http("POST", f"{relay.mgmt}/v1/instances/offline", {"ids": [101, 102]}, ADMIN_H)[0] == 200
    assert http("POST", f"{relay.mgmt}/v1/instances/online", {"ids": [102]}, ADMIN_H)[0] == 200
    assert http("POST", f"{relay.mgmt}/v1/instances/offline", {"ids": [424242]}, ADMIN_H)[0] == 404
    assert http("POST", f"{relay.mgmt}/v1/instances/offline", {"ids": "1"}, ADMIN_H)[0] == 400
    assert http("POST", url, {"event": "del", "instances": [instance]}, ADMIN_H)[1]["data"]["instance_count"] == 1
    assert http("POST", f"{relay.mgmt}/v1/instances/query_tasks", {"p_id": 101, "d_id": 102}, ADMIN_H)[0] == 404
    assert http("POST", url, {"event": "move", "instances": []}, ADMIN_H)[0] == 400

    oversized = b'{"event": "set", "instances": [], "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    status, body, _ = http("POST", url, raw=oversized, headers=ADMIN_H)
    assert status == 413 and body["error"]["code"] == 413

    # a registered worker taken offline shows as not ready, and comes back
    wid = workers(relay)[0]["id"]
    assert http("POST", f"{relay.mgmt}/v1/instances/offline", {"ids": [wid]}, ADMIN_H)[0] == 200
    item = next(w for w in workers(relay) if w["id"] == wid)
    assert (item["state"], item["state_message"]) == ("not_ready", "taken offline by the operator")
    assert http("POST", f"{relay.mgmt}/v1/instances/online", {"ids": [wid]}, ADMIN_H)[0] == 200
    assert next(w for w in workers(relay) if w["id"] == wid)["state"] == "ready"

    status, body, _ = http(
        "POST", f"{relay.mgmt}/query_worker_info", {"instance_id": model_name, "worker_ids": [wid]}, ADMIN_H
    )
    assert status == 200 and isinstance(body["event_id"], str)
    [info] = body["worker_infos"]
    assert set(info) == {
        "instance_id",
        "worker_id",
        "ip",
        "port",
        "peer_init_url",
        "registration_time",
        "last_heartbeat_time",
    }
    assert (
        info["worker_id"] == wid
        and info["ip"] == "127.0.0.1"
        and info["last_heartbeat_time"] >= info["registration_time"]
    )
    assert (
        http("POST", f"{relay.mgmt}/query_worker_info", {"instance_id": "nope", "worker_ids": [0]}, ADMIN_H)[0] == 404
    )


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,port,path,headers,raw",
    [
        ("POST", "api", "/v1/chat/completions", KEY_H, b"{not json"),
        ("POST", "api", "/v1/chat/completions", KEY_H, b'{"model": 5, "messages": []}'),
        ("POST", "api", "/v1/chat/completions", KEY_H, b'{"model": "m"}'),
        (
            "POST",
            "api",
            "/v1/chat/completions",
            KEY_H,
            b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
        ),
        ("POST", "api", "/v1/completions", KEY_H, b'{"model": "m", "prompt": "x", "n": 3}'),
        ("POST", "api", "/v1/completions", KEY_H, b'{"model": "m", "prompt": "x", "temperature": "hot"}'),
        ("POST", "api", "/v1/completions", KEY_H, b"[1, 2]"),
        (
            "POST",
            "api",
            "/api/v1/jobs",
            KEY_H,
            b'{"type": "image", "model": "m", "messages": [{"role": "user", "content": "x"}]}',
        ),
        ("POST", "api", "/api/v1/jobs", KEY_H, b""),
        ("POST", "api", "/api/v1/workers/register", {"X-Join-Token": JOIN}, b'{"name": "x"}'),
        (
            "POST",
            "api",
            "/api/v1/workers/register",
            {"X-Join-Token": JOIN},
            b'{"name": "x", "peer_id": "p", "model": "m", "port": 70000}',
        ),
        ("PUT", "api", "/api/v1/workers/1/config", ADMIN_H, b'{"acceptance_rate": 2}'),
        ("PUT", "api", "/api/v1/workers/1/config", ADMIN_H, b'{"working_hours": "soon"}'),
        ("POST", "api", "/api/v1/reports", KEY_H, b'{"peer_id": "p", "success": "yes"}'),
        ("POST", "mgmt", "/instances/refresh", ADMIN_H, b'{"event": "add"}'),
        (
            "POST",
            "mgmt",
            "/instances/refresh",
            ADMIN_H,
            b'{"event": "add", "instances": [{"id": -1, "model_name": "m", "role": "prefill"}]}',
        ),
        ("POST", "mgmt", "/v1/instances/online", ADMIN_H, b'{"ids": []}'),
        ("POST", "mgmt", "/v1/instances/query_tasks", ADMIN_H, b'{"p_id": "a", "d_id": 1}'),
        ("POST", "mgmt", "/backup_info", ADMIN_H, b'{"is_master": "yes", "is_abnormal": false}'),
        ("POST", "mgmt", "/query_worker_info", ADMIN_H, b'{"instance_id": "m"}'),
    ],
)
def test_bad_input_gets_a_400_with_a_json_message(relay, method, port, path, headers, raw):
    status, body, _ = http(method, getattr(relay, port) + path, raw=raw, headers=headers)
    assert status == 400, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert http("GET", f"{relay.mgmt}/liveness")[0] == 200


@pytest.mark.parametrize(
    "method,port,path,headers",
    [
        ("GET", "api", "/api/v1/workers/999999", ADMIN_H),
        ("GET", "api", "/api/v1/workers/abc", ADMIN_H),
        ("PUT", "api", "/api/v1/workers/999999/config", ADMIN_H),
        ("POST", "api", "/api/v1/workers/999999/heartbeat", {}),
        ("GET", "api", "/api/v1/jobs/nope", KEY_H),
        ("GET", "api", "/no/such/path", {}),
        ("GET", "mgmt", "/no/such/path", {}),
        ("GET", "obs", "/no/such/path", {}),
    ],
)
def test_unknown_ids_and_paths_get_a_404(relay, method, port, path, headers):
    status, body, _ = http(method, getattr(relay, port) + path, body={}, headers=headers)
    assert status == 404 and body["error"]["code"] == 404


def test_wrong_method_gets_a_405(relay):
    status, body, headers = http("DELETE", f"{relay.api}/v1/workers", headers=ADMIN_H)
    assert status == 405 and "GET" in headers["Allow"] and body["error"]["code"] == 405


def test_openapi_document_is_fuzzed_without_a_server_error(relay, tmp_path):
    status, document, _ = http("GET", f"{relay.api}/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1")
    assert {"/v1/workers", "/v1/chat/completions", "/v1/completions", "/v1/models", "/api/v1/jobs"} <= set(
        document["paths"]
    )
    run = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "schemathesis"),
            "run",
            f"{relay.api}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--no-shrink",
            "--phases",
            "examples,coverage,fuzzing",
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--header",
            f"Authorization: Bearer {ADMIN}",
            "--header",
            f"X-API-Key: {KEYS[0]}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stdout[-6000:]
    # The fuzzer may have pushed odd load-control configs to the real servers: put them back.
    for worker in workers(relay):
        http("PUT", f"{relay.api}/api/v1/workers/{worker['id']}/config", {}, ADMIN_H)
    assert http("GET", f"{relay.mgmt}/liveness")[0] == 200


# ---- restart -------------------------------------------------------------------------------------


def test_state_survives_a_restart_and_servers_do_not_need_the_relay(relay_swarm, llama_path, model_name):
    swarm, relay = relay_swarm
    before = {w["id"]: w for w in workers(relay)}
    status, job, _ = http(
        "POST",
        f"{relay.api}/api/v1/jobs",
        {"type": "llm", "model": model_name, "max_tokens": 3, "messages": [{"role": "user", "content": "z"}]},
        KEY_H,
    )
    assert status == 201
    wait_until(
        lambda: http("GET", f"{relay.api}/api/v1/jobs/{job['job_id']}", headers=KEY_H)[1]["status"] == "completed",
        180,
        what="job completed",
    )
    assert relay.stop() == 0

    # the swarm keeps serving while the relay is away
    with AutoDistributedModelForCausalLM.from_pretrained(llama_path, swarm.initial_peers) as model:
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3).shape == (1, 6)

    relay.args = [a for a in relay.args if a not in ("--admin-token", ADMIN)]  # the stored hash still holds
    relay.start()
    after = {w["id"]: w for w in workers(relay)}
    assert set(after) == set(before)
    assert http("GET", f"{relay.api}/api/v1/jobs/{job['job_id']}", headers=KEY_H)[1]["status"] == "completed"
    first = max(w["heartbeat_time"] for w in after.values() if w["heartbeat_time"])
    wait_until(
        lambda: sum(w["state"] == "ready" and w["heartbeat_time"] > first for w in workers(relay)) == 3,
        180,
        what="servers heartbeating to the restarted relay",
    )
    assert all(server.proc.poll() is None for server in swarm.servers)


def test_server_link_refreshes_tokens_before_they_expire(relay, tmp_path):
    """The server side of the protocol (swarm/relay_link.py) against the live relay, with its clock
    moved to 3.5 h before the access token expires."""
    applied, now = [], [time.time()]

    async def registration(relay_url):
        return signed_registration("link", relay_url)

    async def heartbeat():
        return {"load": {"open_sessions": 0}}

    async def apply(config):
        applied.append(config)

    async def scenario():
        path = tmp_path / "relay" / "creds.json"
        link = RelayLink(
            relay.api, path, registration, heartbeat, apply, period=1, join_token=JOIN, clock=lambda: now[0]
        )
        await link.beat()
        assert applied == [
            {
                "acceptance_rate": 1.0,
                "max_concurrent_sessions": None,
                "max_sessions_per_hour": None,
                "working_hours": None,
            }
        ]
        first = link.credentials.token
        now[0] += 20.5 * 3600
        await link.beat()
        assert link.credentials.token != first
        assert json.loads(path.read_text())["token"] == link.credentials.token
        assert path.stat().st_mode & 0o777 == 0o600
        await link.beat()  # the config did not change again
        assert len(applied) == 1
        await link.goodbye()
        return link.credentials.worker_id

    worker_id = asyncio.run(scenario())
    item = next(w for w in workers(relay) if w["id"] == worker_id)
    assert (item["state"], item["state_message"]) == ("not_ready", "went offline gracefully")
