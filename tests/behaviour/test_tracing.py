"""OpenTelemetry tracing: one generation through three servers is one connected trace (client step →
server step → push to the next server → reply), caught by a real OTLP/HTTP receiver on loopback; the
relay's OpenAI API continues the caller's traceparent."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections import Counter

from harness.local_swarm import LocalSwarm
from tests.helpers.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.helpers.relay_process import RelayProcess, http

SPLITS = [(0, 1), (1, 3), (3, 4)]
NEW_TOKENS = 4
KEY = "sk-tracing-test"


def _by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def _generation_complete(spans: list[ReceivedSpan], root_name: str, root_service: str) -> bool:
    """The root is in, and each of its steps reached all three servers."""
    roots = [s for s in spans if s.name.startswith(root_name) and s.service == root_service]
    if not roots:
        return False
    trace = [s for s in spans if s.trace_id == roots[0].trace_id]
    steps = [s for s in trace if s.name == "swarm.client.step"]
    servers = [s for s in trace if s.name == "swarm.server.step"]
    return bool(steps) and len(servers) >= len(steps) * len(SPLITS)


def _check_generation_trace(spans: list[ReceivedSpan], root: ReceivedSpan, peers: dict[str, str]) -> None:
    """Every span of the generation is in the root's trace and hangs from it; each client step
    reaches the three servers in order, through pushes, and each server replies."""
    trace = [s for s in spans if s.trace_id == root.trace_id]
    ids = _by_id(trace)
    for span in trace:  # connected: every parent is in the trace, up to the root
        seen = span
        while seen is not root:
            assert seen.parent_id in ids, f"{seen.name} of {seen.service} has a parent outside the trace"
            seen = ids[seen.parent_id]
    children: dict[str, list[ReceivedSpan]] = {}
    for span in trace:
        children.setdefault(span.parent_id, []).append(span)

    steps = [s for s in trace if s.name == "swarm.client.step"]
    assert steps and all(s.parent_id == root.span_id and s.kind == "client" for s in steps)
    prefill = min(steps, key=lambda s: s.attributes["swarm.position"])
    assert prefill.attributes["swarm.position"] == 0
    assert Counter(s.service for s in trace if s.name == "swarm.server.step") == {"swarm-server": len(steps) * 3}
    for step in steps:
        # client step → server 0 → push → server 1 → push → server 2, each replying
        hop = [s for s in children.get(step.span_id, []) if s.name == "swarm.server.step"]
        for start, end in SPLITS:
            assert len(hop) == 1, f"step at {step.attributes['swarm.position']}: {len(hop)} server spans at {start}"
            server = hop[0]
            assert server.kind == "server" and server.attributes["swarm.blocks"] == f"{start}:{end}"
            assert server.resource["service.instance.id"] == peers[f"{start}:{end}"]
            assert server.attributes["swarm.position"] == step.attributes["swarm.position"]
            below = children.get(server.span_id, [])
            assert [s.name for s in below if s.name == "swarm.reply"] == ["swarm.reply"]
            pushes = [s for s in below if s.name == "swarm.push"]
            if end == SPLITS[-1][1]:
                assert pushes == []
                break
            assert len(pushes) == 1 and pushes[0].kind == "producer"
            hop = [s for s in children.get(pushes[0].span_id, []) if s.name == "swarm.server.step"]


def test_one_generation_through_three_servers_is_one_connected_trace(llama_path, tmp_path):
    with (
        OtlpReceiver() as receiver,
        LocalSwarm(
            llama_path,
            SPLITS,
            server_args=["--throughput", "100", "--otlp-endpoint", receiver.endpoint],
            workdir=tmp_path / "swarm",
        ) as swarm,
    ):
        peers = {f"{start}:{end}": server.peer_id for (start, end), server in zip(SPLITS, swarm.servers)}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "client.generate",
                "--model",
                str(llama_path),
                "--initial-peers",
                *swarm.initial_peers,
                "--prompt",
                "hello",
                "--max-new-tokens",
                str(NEW_TOKENS),
                "--verify",
                "0",
                "--otlp-endpoint",
                receiver.endpoint,
            ],
            capture_output=True,
            text=True,
            timeout=240,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 0, run.stderr
        spans = receiver.wait_for(lambda s: _generation_complete(s, "text_completion ", "swarm-client"))
        roots = [s for s in spans if s.service == "swarm-client" and s.parent_id == ""]
        assert len(roots) == 1, [s.name for s in roots]  # one generation, one trace
        root = roots[0]
        assert root.kind == "client" and root.name.startswith("text_completion ")
        assert root.attributes["gen_ai.operation.name"] == "text_completion"
        assert root.attributes["gen_ai.request.model"] == root.name.split(" ", 1)[1]
        assert root.attributes["gen_ai.request.max_tokens"] == NEW_TOKENS
        assert root.attributes["gen_ai.usage.output_tokens"] == NEW_TOKENS
        assert root.attributes["gen_ai.usage.input_tokens"] > 0
        assert 0 < root.attributes["gen_ai.latency.time_to_first_token"] <= root.attributes["gen_ai.latency.e2e"]
        _check_generation_trace(spans, root, peers)

        # The relay's OpenAI API continues the caller's trace.
        relay = RelayProcess(
            tmp_path,
            [
                "--initial-peers",
                *swarm.initial_peers,
                "--db",
                f"sqlite:///{tmp_path / 'relay.db'}",
                "--models",
                str(llama_path),
                "--verify",
                "0",
                "--api-keys",
                KEY,
                "--prompt-lookup",
                "0",
                "--otlp-endpoint",
                receiver.endpoint,
            ],
        )
        relay.start()
        try:
            trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
            model = http("GET", f"{relay.api}/v1/models", headers={"X-API-Key": KEY})[1]["data"][0]["id"]
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            status, body, _ = http(
                "POST",
                f"{relay.api}/v1/chat/completions",
                chat,
                {"traceparent": f"00-{trace_id}-{parent_id}-01", "X-API-Key": KEY},
            )
            assert status == 200, body
            spans = receiver.wait_for(
                lambda s: _generation_complete(
                    [x for x in s if x.trace_id == trace_id], "POST /v1/chat/completions", "swarm-relay"
                )
            )
        finally:
            relay.stop()
        request = [s for s in spans if s.service == "swarm-relay" and s.name == "POST /v1/chat/completions"]
        assert len(request) == 1
        assert (request[0].trace_id, request[0].parent_id, request[0].kind) == (trace_id, parent_id, "server")
        assert request[0].attributes["http.response.status_code"] == 200
        generation = [s for s in spans if s.service == "swarm-relay" and s.name.startswith("text_completion ")]
        assert [g.parent_id for g in generation] == [request[0].span_id]
        _check_generation_trace([s for s in spans if s is not request[0]], generation[0], peers)
