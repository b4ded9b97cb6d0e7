"""The command-line entry points: help, configuration errors, bootstrap identity, one-line generation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from blocks.synthetic import make_char_tokenizer, make_random_checkpoint
from harness.processes import Child

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
    )


@pytest.mark.parametrize(
    "module, flags",
    [
        (
            "swarm.serve",
            [
                "--model",
                "--blocks",
                "--initial-peers",
                "--host",
                "--port",
                "--device",
                "--dtype",
                "--cache-tokens",
                "--model-name",
                "--nat-port-map",
                "--max-length",
                "--session-timeout",
                "--public-ip",
                "--no-bridge",
                "--bridge-max-servers",
                "--bridge-max-circuits",
                "--bridge-max-mbytes",
                "--bridge-max-seconds",
                # their earlier names, still accepted
                "--no-relay",
                "--relay-max-servers",
                "--relay-hop-limit",
                "--relay-max-mbytes",
                "--relay-max-seconds",
            ],
        ),
        (
            "bootstrap",
            [
                "--host",
                "--port",
                "--identity",
                "--nat-port-map",
                "--public-ip",
                "--no-bridge",
                "--bridge-max-circuits",
                "--no-relay",
                "--relay-hop-limit",
            ],
        ),
        (
            "client.generate",
            [
                "--model",
                "--initial-peers",
                "--prompt",
                "--max-new-tokens",
                "--do-sample",
                "--temperature",
                "--top-k",
                "--top-p",
            ],
        ),
    ],
)
def test_help_explains_every_flag(module, flags):
    result = run("-m", module, "--help")
    assert result.returncode == 0
    for flag in flags:
        assert flag in result.stdout
    assert "SWARM_" in result.stdout and "example:" in result.stdout


HEAVY = ("torch", "transformers", "hivemind", "aiohttp")
# Runs a CLI module in-process and reports, at exit, which heavy packages it imported.
_PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("IMPORTED", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr))
sys.argv = ["prog", *{argv!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["swarm.serve", "bootstrap", "client.generate", "relay", "relay.health"])
@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--no-such-flag"], 2)])
def test_help_and_bad_flags_answer_without_heavy_imports(module, argv, code):
    """--help and a wrong flag need neither torch, transformers nor hivemind (seconds of imports each)."""
    result = run("-c", _PROBE.format(heavy=HEAVY, argv=argv, module=module))
    assert result.returncode == code, result.stderr
    assert "IMPORTED []" in result.stderr
    assert ("usage:" in result.stdout) if code == 0 else ("unrecognized arguments: --no-such-flag" in result.stderr)


@pytest.mark.parametrize("command", [[], ["configure"], ["set"], ["start"], ["status"]])
def test_every_worker_command_answers_help_and_bad_flags_without_heavy_imports(command):
    result = run("-c", _PROBE.format(heavy=HEAVY, argv=[*command, "--help"], module="swarm.worker"))
    assert result.returncode == 0 and "usage: python -m swarm.worker" in result.stdout, result.stderr
    assert "IMPORTED []" in result.stderr
    argv = {(): ["status"], ("set",): ["set", "max_length", "5"]}.get(tuple(command), command) + ["--no-such-flag"]
    result = run("-c", _PROBE.format(heavy=HEAVY, argv=argv, module="swarm.worker"))
    assert result.returncode == 2 and "--no-such-flag" in result.stderr and "IMPORTED []" in result.stderr


def test_serve_rejects_bad_paths_and_ranges_without_heavy_imports(tmp_path, llama_path):
    for argv, message in [
        (["--model", str(tmp_path / "nowhere"), "--blocks", "0:1"], "config.json not found"),
        (["--model", str(llama_path), "--blocks", "0:9"], "it has 4 blocks"),
        (["--model", str(llama_path), "--num-blocks", "5"], "exceeds the model's 4 blocks"),
    ]:
        result = run("-c", _PROBE.format(heavy=HEAVY, argv=argv, module="swarm.serve"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "IMPORTED []" in result.stderr


def test_serve_rejects_bad_configuration_naming_the_key(tmp_path, llama_path):
    config = tmp_path / "server.yaml"
    config.write_text("cache_tokens: 100\nblocks_typo: 0:2\n")
    result = run("-m", "swarm.serve", "--model", str(llama_path), "--blocks", "0:2", "--config", str(config))
    assert result.returncode == 2 and "blocks_typo" in result.stderr

    result = run("-m", "swarm.serve", "--model", str(llama_path), "--blocks", "3:1")
    assert result.returncode == 2 and "blocks" in result.stderr and "START < END" in result.stderr

    result = run("-m", "swarm.serve", "--model", str(llama_path), "--blocks", "0:9")
    assert result.returncode == 2 and "it has 4 blocks" in result.stderr

    result = run("-m", "swarm.serve", "--model", str(tmp_path / "nowhere"), "--blocks", "0:1")
    assert result.returncode == 2 and "config.json not found" in result.stderr


def test_bootstrap_prints_maddrs_and_keeps_its_identity(tmp_path):
    key = tmp_path / "bootstrap.key"
    peers = []
    for attempt in range(2):
        child = Child(
            "bootstrap",
            [sys.executable, "-m", "bootstrap", "--host", "127.0.0.1", "--port", "0", "--identity", str(key)],
            tmp_path / f"bootstrap{attempt}.log",
        )
        try:
            line = child.wait_for_line(lambda line: "/p2p/" in line, 60)
        finally:
            assert child.stop() in (0, -15)
        assert line.startswith("/ip4/127.0.0.1/tcp/")
        peers.append(line.rsplit("/p2p/", 1)[1])
    assert key.exists() and peers[0] == peers[1]


def test_generate_cli_streams_the_same_text_as_transformers(llama_swarm, llama_path, llama_ref):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    prompt = "Hello, swarm"
    result = run(
        "-m",
        "client.generate",
        "--model",
        str(llama_path),
        "--initial-peers",
        *llama_swarm.initial_peers,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
    )
    assert result.returncode == 0, result.stderr
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = llama_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    expected_text = prompt + tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == expected_text


def test_generate_cli_reports_a_model_nobody_serves(llama_swarm, tmp_path):
    path = make_random_checkpoint(tmp_path / "unserved", "llama", num_layers=3, seed=9)
    make_char_tokenizer(path)
    result = run(
        "-m",
        "client.generate",
        "--model",
        str(path),
        "--initial-peers",
        *llama_swarm.initial_peers,
        "--prompt",
        "x",
        "--max-new-tokens",
        "2",
        "--no-chat",
        timeout=60,
    )
    assert result.returncode == 1
    assert "error: no server of model" in result.stderr and "serves block(s) 0-2" in result.stderr


def test_a_library_script_that_never_shuts_the_model_down_exits_cleanly(llama_swarm, llama_path):
    script = (
        "import torch\n"
        "from client import AutoDistributedModelForCausalLM\n"
        f"model = AutoDistributedModelForCausalLM.from_pretrained({str(llama_path)!r}, {llama_swarm.initial_peers!r})\n"
        "print(model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape)\n"
    )
    result = run("-c", script, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([1, 5])"
    assert "Task was destroyed" not in result.stderr and "Traceback" not in result.stderr
