"""LoRA adapters in a live swarm: an adapter servers serve and a client's own adapter both give the
local peft model's tokens; sessions are routed to servers that can run their adapter; a client's own
adapter is kept for its session only and its memory is returned; wrong adapters are refused clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from blocks.adapters import AdapterError, check_adapter
from blocks.checkpoint import Checkpoint
from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM, BadRequestError, MissingBlocksError
from harness.local_swarm import LocalSwarm
from tests.helpers.client_worker import prompt

NEW_TOKENS = 8


def save_adapter(base, path, seed: int, **config) -> None:
    """A LoRA adapter of `base` with random (non-zero) weights, saved as peft saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(path)


def peft_generate(base, adapter, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def adapters(model6, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    all_projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    save_adapter(model6, root / "math", 1, r=4, lora_alpha=8, target_modules=all_projections)
    save_adapter(model6, root / "mine", 2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def adapter_swarm(model6, adapters, tmp_path_factory):
    """Blocks 0:3 and 3:6 with the adapter "math"; a faster 0:6 without it."""
    with LocalSwarm(model6, [], workdir=tmp_path_factory.mktemp("adapter-swarm")) as swarm:
        for start, end in ((0, 3), (3, 6)):
            swarm.add_server(start, end, "--adapters", str(adapters / "math"), "--throughput", "100", wait=False)
        swarm.add_server(0, 6, "--throughput", "100000", wait=False)
        for server in swarm.servers:
            swarm.wait_online(server)
        yield swarm


def status(server) -> dict:
    with urllib.request.urlopen(server.metrics_url.replace("/metrics", "/status"), timeout=30) as reply:
        return json.loads(reply.read())


def test_an_adapter_the_servers_serve_gives_peft_s_tokens(model6, ref6, adapters, adapter_swarm):
    ids = prompt(3)
    with AutoDistributedModelForCausalLM.from_pretrained(model6, adapter_swarm.initial_peers, verify=1.0) as model:
        assert model.served_adapters() == ["math"]
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS, active_adapter="math") as session:
            output = model.generate(ids, max_new_tokens=NEW_TOKENS, session=session)
            served = {server.peer_id for server in adapter_swarm.servers[:2]}
            assert {peer for peer, _, _ in session.chain} <= served and session.adapter_name == "math"
        assert torch.equal(output, peft_generate(model6, adapters / "math", ids))
        # The same client without an adapter: the base model's tokens, through any server.
        assert torch.equal(
            model.generate(ids, max_new_tokens=NEW_TOKENS),
            ref6.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False),
        )
        # An adapter nobody serves (nor this client holds) is a clear error before anything is generated.
        with pytest.raises(MissingBlocksError, match="serving adapter 'algebra'"):
            model.generate(ids, max_new_tokens=2, active_adapter="algebra")
        assert model.convicted == {}


def test_a_client_s_own_adapter_gives_peft_s_tokens_and_its_memory_is_returned(model6, adapters, adapter_swarm):
    ids = prompt(4)
    expected = peft_generate(model6, adapters / "mine", ids)
    fast = adapter_swarm.servers[2]
    with AutoDistributedModelForCausalLM.from_pretrained(model6, adapter_swarm.initial_peers, verify=1.0) as model:
        assert model.load_adapter(adapters / "mine") == "mine"
        model.set_adapter("mine")
        free = status(fast)["cache"]["tokens_free"]
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, session=session), expected)
            assert session.chain == [(fast.peer_id, 0, 6)]
            held = status(fast)["cache"]["tokens_free"]
            # the session's KV, and its adapter charged as cache tokens on top
            assert free - held > ids.shape[1] + NEW_TOKENS
        deadline = time.monotonic() + 60
        while status(fast)["cache"]["tokens_free"] < free:
            assert time.monotonic() < deadline, "the adapter's share of the cache was not returned"
            time.sleep(0.2)
        assert model.convicted == {}
    # Never shared: another client asking for "mine" gets no server's copy of it.
    with AutoDistributedModelForCausalLM.from_pretrained(model6, adapter_swarm.initial_peers) as other:
        with pytest.raises(MissingBlocksError, match="serving adapter 'mine'"):
            other.generate(ids, max_new_tokens=2, active_adapter="mine")


def test_an_adapter_over_a_server_s_limit_is_refused(model6, adapters, tmp_path):
    with LocalSwarm(
        model6, [(0, 6)], server_args=["--max-client-adapter-mbytes", "0.001"], workdir=tmp_path / "swarm"
    ) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(model6, swarm.initial_peers, verify=0) as model:
            model.load_adapter(adapters / "mine")
            with pytest.raises(BadRequestError, match="exceed this server's limit"):
                model.generate(prompt(1), max_new_tokens=2, active_adapter="mine")
            assert model.generate(prompt(1), max_new_tokens=2).shape[1] == prompt(1).shape[1] + 2


def test_wrong_adapters_are_refused_with_a_clear_error(model6, adapters, tmp_path):
    other = make_random_checkpoint(tmp_path / "wider", "llama", num_layers=6, seed=3, hidden_size=96)
    save_adapter(other, tmp_path / "wrong-shapes", 3, r=2, lora_alpha=4, target_modules=["q_proj"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters / "mine" / "adapter_config.json", pickled)
    torch.save({"weights": torch.zeros(2)}, pickled / "adapter_model.bin")
    config = Checkpoint(model6).config
    with pytest.raises(AdapterError, match="do not fit a 64 → 64 projection"):
        check_adapter(tmp_path / "wrong-shapes", config)
    with pytest.raises(AdapterError, match="adapter_model.bin is a pickle, which is never loaded"):
        check_adapter(pickled, config)
    for bad, message in ((tmp_path / "wrong-shapes", "do not fit a 64 → 64 projection"), (pickled, "is a pickle")):
        run = subprocess.run(
            [sys.executable, "-m", "swarm.serve", "--model", str(model6), "--blocks", "0:6", "--adapters", str(bad)],
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_the_relay_serves_an_adapter_as_model_base_colon_adapter(model6, adapters, adapter_swarm, tmp_path):
    from blocks.synthetic import make_char_tokenizer
    from client import load_tokenizer
    from tests.helpers.relay_process import RelayProcess, http

    local = tmp_path / "llama6"  # the same checkpoint (so the same model name), with a tokenizer for the relay
    shutil.copytree(model6, local)
    make_char_tokenizer(local)
    relay = RelayProcess(
        tmp_path,
        [
            "--initial-peers",
            *adapter_swarm.initial_peers,
            "--db",
            f"sqlite:///{tmp_path / 'relay.db'}",
            "--models",
            str(local),
            "--api-keys",
            "sk-adapters",
            "--verify",
            "0",
        ],
    )
    relay.start()
    try:
        key = {"X-API-Key": "sk-adapters"}
        names = [m["id"] for m in http("GET", f"{relay.api}/v1/models", headers=key)[1]["data"]]
        base = names[0]
        assert names == [base, f"{base}:math"]
        body = {"model": f"{base}:math", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
        status, reply, _ = http("POST", f"{relay.api}/v1/completions", body, key)
        assert status == 200 and reply["model"] == f"{base}:math", reply
        tokenizer = load_tokenizer(local)
        ids = tokenizer("Hello", return_tensors="pt").input_ids
        expected = peft_generate(model6, adapters / "math", ids)[0, ids.shape[1] : ids.shape[1] + 6]
        assert reply["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        status, reply, _ = http("POST", f"{relay.api}/v1/completions", {**body, "model": f"{base}:algebra"}, key)
        assert (
            status == 404 and "no server of" in reply["error"]["message"] and "'algebra'" in reply["error"]["message"]
        )
    finally:
        relay.stop()
