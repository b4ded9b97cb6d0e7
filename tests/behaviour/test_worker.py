"""An operator's day with `python -m swarm.worker`: configure, start, serve a client, read status, stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from harness.local_swarm import ONLINE_MARKER
from harness.processes import Child, child_env
from tests.helpers.client_worker import prompt

pytestmark = pytest.mark.slow


def worker(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarm.worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_configure_start_status_and_stop_a_worker(llama_path, llama_ref, tmp_path):
    config = tmp_path / "worker.yaml"
    # The volunteer platform's variable names are read too.
    env = child_env({"SWARM_WORKER_CONFIG": str(config), "GPU_REGION": "oceania"})
    configured = worker("configure", "--model", str(llama_path), "--blocks", "0:4", "--throughput", "100", env=env)
    assert configured.returncode == 0, configured.stderr
    assert worker("set", "max_length", "128", env=env).returncode == 0
    assert worker("status", env=env).returncode == 1  # nothing runs yet

    server = Child("worker", [sys.executable, "-m", "swarm.worker", "start"], tmp_path / "worker.log", env=env)
    try:
        online = server.wait_for_line(lambda line: line.startswith(ONLINE_MARKER), 180)
        peer_id = online.split(" peer ", 1)[1].split(",", 1)[0]
        ids = prompt(3)
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, [f"/ip4/127.0.0.1/tcp/{port_of(env)}/p2p/{peer_id}"], verify=0
        ) as model:
            with model.inference_session(max_length=ids.shape[1] + 6) as session:
                model.generate(ids, max_new_tokens=2, session=session)
                during = json.loads(worker("status", "--json", env=env).stdout)
                more = model.generate(None, max_new_tokens=4, session=session)
        assert torch.equal(more, llama_ref.generate(ids, max_new_tokens=6))

        assert (during["state"], during["start_block"], during["end_block"]) == ("online", 0, 4)
        assert (during["peer_id"], during["region"]) == (peer_id, "oceania")
        assert during["sessions"] == {"open": 1, "max_concurrent": None, "max_length": 128}
        assert during["load"]["prompt_tokens"] == ids.shape[1] and during["relay"] is None
        text = worker("status", env=env)
        assert text.returncode == 0, text.stderr
        assert "online · model" in text.stdout and "blocks 0:4" in text.stdout and "region oceania" in text.stdout
        assert "0 open" in text.stdout and "reachable  yes" in text.stdout

        server.signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()
    assert not (tmp_path / "worker.status.json").exists()
    stopped = worker("status", env=env)
    assert stopped.returncode == 1 and "no server is running" in stopped.stderr


def port_of(env: dict) -> int:
    """The server's DHT port, read from its own status (the config leaves it to the system)."""
    return int(json.loads(worker("status", "--json", env=env).stdout)["addresses"][0].split("/tcp/")[1].split("/")[0])
