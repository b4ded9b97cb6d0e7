"""`python -m swarm.worker`: configure, set, start and status, run in-process on a real checkpoint's config."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from swarm import worker
from swarm.status import RecentProblems, ServerStatus, StatusFile

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "worker.yaml"
    monkeypatch.setenv("SWARM_WORKER_CONFIG", str(path))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: configure never asks
    return path


def keys(path):
    return yaml.safe_load(path.read_text())


def test_configure_writes_only_what_was_given_owner_only_and_keeps_earlier_keys(config, llama_path, capsys):
    assert worker.main(["configure", "--model", str(llama_path), "--blocks", "0:2", "--initial-peers", PEER]) == 0
    assert keys(config) == {"model": str(llama_path), "blocks": "0:2", "initial_peers": [PEER]}
    assert config.stat().st_mode & 0o777 == 0o600
    assert worker.main(["configure", "--region", "oceania", "--max-length", "512"]) == 0
    assert keys(config) == {
        "model": str(llama_path),
        "blocks": "0:2",
        "initial_peers": [PEER],
        "region": "oceania",
        "max_length": 512,
    }
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--blocks", "0:2"], "--model is required (there is no terminal to ask on)"),
        (["--model", "MODEL", "--blocks", "0:9"], "it has 4 blocks"),
        (["--model", "MODEL", "--region", "mars"], "region: unknown region 'mars'"),
        (["--model", "MODEL", "--initial-peers", "127.0.0.1:31337"], "is not a peer's multiaddr"),
    ],
)
def test_configure_refuses_a_bad_config_and_writes_nothing(config, llama_path, capsys, argv, message):
    argv = [str(llama_path) if a == "MODEL" else a for a in argv]
    assert worker.main(["configure", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not config.exists()


def test_configure_asks_on_a_terminal_and_asks_again_after_a_bad_answer(config, llama_path, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    answers = iter([str(llama_path), "0:9", "1:3", "", "mars", "asia-east", "gpu-box-7", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert worker.main(["configure", "--initial-peers", PEER]) == 0
    out = capsys.readouterr().out
    assert "it has 4 blocks" in out and "unknown region 'mars'" in out
    assert keys(config) == {
        "model": str(llama_path),
        "blocks": "1:3",
        "initial_peers": [PEER],
        "region": "asia-east",
        "public_name": "gpu-box-7",
    }


def test_set_changes_one_key_checked_against_the_schema(config, llama_path, capsys):
    worker.main(["configure", "--model", str(llama_path), "--blocks", "0:2"])
    assert worker.main(["set", "max-length", "300"]) == 0
    assert worker.main(["set", "no-bridge", "yes"]) == 0
    assert worker.main(["set", "initial_peers", PEER, PEER.replace(".1/", ".2/")]) == 0
    assert worker.main(["set", "relay_max_servers", "3"]) == 0  # an earlier name of bridge_max_servers
    assert keys(config) == {
        "model": str(llama_path),
        "blocks": "0:2",
        "max_length": 300,
        "no_bridge": True,
        "initial_peers": [PEER, PEER.replace(".1/", ".2/")],
        "bridge_max_servers": 3,
    }
    capsys.readouterr()
    for argv, message in [
        (["max_lenght", "5"], "unknown key 'max_lenght' (did you mean max_length?)"),
        (["max_length", "many"], "max_length: Input should be a valid integer"),
        (["blocks", "0:7"], "it has 4 blocks"),
        (["max_length", "1", "2"], "max_length takes one value, got 2"),
        (["dtype", "float8"], "dtype"),
    ]:
        assert worker.main(["set", *argv]) == 2, argv
        assert message in capsys.readouterr().err
    assert keys(config)["max_length"] == 300


def test_commands_without_a_config_say_how_to_write_one(config, capsys):
    assert worker.main(["set", "max_length", "5"]) == 2
    assert "no config at" in capsys.readouterr().err
    assert worker.main(["start"]) == 2
    assert "worker configure" in capsys.readouterr().err
    assert worker.main(["status"]) == 1
    assert "no server is running from" in capsys.readouterr().err


def test_start_refuses_a_second_server_from_the_same_config(config, llama_path, capsys):
    worker.main(["configure", "--model", str(llama_path), "--blocks", "0:2"])
    StatusFile.write(worker.status_path(config), "http://127.0.0.1:1/status")  # this very process: alive
    assert worker.main(["start"]) == 2
    assert f"already running (pid {os.getpid()})" in capsys.readouterr().err


def sample_status(**overrides) -> dict:
    status = {
        "state": "online",
        "version": "0.1.0",
        "model": "llama",
        "start_block": 0,
        "end_block": 2,
        "peer_id": "QmPeer",
        "addresses": ["/ip4/127.0.0.1/tcp/4/p2p/QmPeer"],
        "region": "",
        "uptime_seconds": 125.0,
        "sessions": {"open": 2, "max_concurrent": None, "max_length": 256},
        "cache": {"tokens_total": 1000, "tokens_free": 488, "prefix_tokens": 32},
        "load": {
            "throughput_tokens_per_s": 100.0,
            "acceptance_rate": 1.0,
            "requests_waiting": 0,
            "median_step_ms": 3.25,
            "prompt_tokens": 40,
            "generation_tokens": 12,
        },
        "relay": {
            "url": "http://127.0.0.1:8000",
            "worker_id": 3,
            "last_heartbeat_seconds_ago": None,
            "last_error": "ClientConnectorError: refused",
        },
        "reachability": {"reachable": False, "bridge": False, "attached_bridges": ["QmBridge"]},
        "recent_problems": [{"time": 1000.0, "level": "WARNING", "logger": "swarm.relay_link", "message": "refused"}],
    }
    status.update(overrides)
    return status


def test_status_reads_the_url_in_the_status_file_and_tells_the_operator(config, llama_path, capsys):
    worker.main(["configure", "--model", str(llama_path), "--blocks", "0:2"])
    answers = [json.dumps(sample_status()).encode(), b'{"state": "online"}']

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = answers.pop(0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        StatusFile.write(worker.status_path(config), f"http://127.0.0.1:{server.server_port}/status")
        capsys.readouterr()
        assert worker.main(["status"]) == 0
        out = capsys.readouterr().out
        for text in [
            "online · model llama · blocks 0:2",
            "up 2 min 5 s",
            "2 open · at most 256 tokens each",
            "488 of 1000 tokens free · 32 hold cached prompts",
            "median step 3.2 ms",
            "worker 3 · no heartbeat acknowledged yet",
            "last error: ClientConnectorError: refused",
            "no (behind NAT) · reached through QmBridge",
            "WARNING swarm.relay_link: refused",
        ]:
            assert text in out, text
        assert worker.main(["status"]) == 1  # an answer that is not a server status is not shown as one
        assert "did not answer with a server status" in capsys.readouterr().err
    finally:
        server.shutdown()
        server.server_close()


def test_status_of_a_server_that_does_not_answer(config, llama_path, capsys):
    assert worker.main(["status", "--url", "http://127.0.0.1:9/status"]) == 1
    assert "the server did not answer at http://127.0.0.1:9/status" in capsys.readouterr().err


def test_status_file_is_removed_only_by_the_process_that_wrote_it(tmp_path):
    path = tmp_path / "worker.status.json"
    StatusFile.write(path, "http://127.0.0.1:5/status")
    found = StatusFile.read(path)
    assert (found.pid, found.url) == (os.getpid(), "http://127.0.0.1:5/status")
    path.write_text(found.model_copy(update={"pid": found.pid + 1}).model_dump_json())
    StatusFile.remove(path)
    assert path.exists()
    path.write_text(found.model_dump_json())
    StatusFile.remove(path)
    assert not path.exists()


def test_recent_problems_keeps_the_last_warnings_only():
    handler = RecentProblems(capacity=3)
    log = logging.getLogger("tests.worker.problems")
    log.addHandler(handler)
    try:
        log.info("not a problem")
        for i in range(5):
            log.warning("problem %d", i)
    finally:
        log.removeHandler(handler)
    assert [p.message for p in handler.problems()] == ["problem 2", "problem 3", "problem 4"]
    assert all(p.time <= time.time() for p in handler.problems())
    ServerStatus.model_validate(sample_status(recent_problems=[p.model_dump() for p in handler.problems()]))
