"""telemetry.tracing: off and free by default; on, spans reach an OTLP/HTTP receiver with the parent
a traceparent names, and a malformed traceparent from a stranger starts a trace of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from protocol.messages import Step
from telemetry.tracing import traces_url
from tests.helpers.otlp_receiver import OtlpReceiver


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_base_url_gets_the_traces_path_and_a_full_one_is_kept():
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"


def test_off_by_default_nothing_of_opentelemetry_is_loaded():
    result = run(
        "import sys\n"
        "import client.model, swarm.handler, relay.openai_api\n"
        "from telemetry import tracing\n"
        "with tracing.span('x', kind='server', parent='00-' + '1' * 32 + '-' + '2' * 16 + '-01') as s:\n"
        "    assert s is None and tracing.traceparent() == ''\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_spans_reach_the_receiver_with_the_parent_they_were_given():
    trace, parent = "a" * 32, "b" * 16
    with OtlpReceiver() as receiver:
        result = run(
            "from telemetry import tracing\n"
            f"tracing.enable({receiver.endpoint!r}, 'unit')\n"
            f"parent = '00-{trace}-{parent}-01'\n"
            "with tracing.span('child', kind='server', parent=parent, attributes={'n': 1, 'x': None}):\n"
            "    with tracing.span('grandchild') as inner:\n"
            "        tracing.set_attributes(inner, k='v')\n"
            "        print(tracing.traceparent())\n"
            "with tracing.span('stranger', parent='00-not-a-trace'):\n"
            "    pass\n"
            "tracing.flush()\n"
        )
        assert result.returncode == 0, result.stderr
        spans = {s.name: s for s in receiver.wait_for(lambda s: len(s) == 3, timeout=30)}
    assert set(spans) == {"child", "grandchild", "stranger"}
    child, grandchild = spans["child"], spans["grandchild"]
    assert (child.trace_id, child.parent_id, child.kind, child.service) == (trace, parent, "server", "unit")
    assert child.attributes == {"n": 1}
    assert (grandchild.trace_id, grandchild.parent_id, grandchild.attributes) == (trace, child.span_id, {"k": "v"})
    assert result.stdout.strip() == f"00-{trace}-{grandchild.span_id}-01"
    assert spans["stranger"].parent_id == "" and spans["stranger"].trace_id != trace


def test_a_step_with_a_malformed_traceparent_is_refused():
    assert Step(position=0, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01").traceparent
    assert Step(position=0).traceparent == ""
    for bad in ("00-xyz", "00-" + "1" * 32 + "-" + "2" * 16 + "-01\n", "x" * 100):
        with pytest.raises(ValidationError):
            Step(position=0, traceparent=bad)
