"""A LAN swarm with no addresses to copy: servers and a client on three hosts of one bridged LAN
(network namespaces this test makes) find each other with libp2p mDNS and generate what transformers
does. Multicast never leaves the namespaces; without root the test cannot build them and says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from discovery.mdns import MdnsUnavailable, lan_python
from tests.helpers.netns import LanTopology, Process


def _why_not() -> str | None:
    try:
        lan_python()
    except MdnsUnavailable as e:
        return str(e)
    return LanTopology.unavailable()


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"LAN namespaces: {WHY_NOT}")


def _server(lan: LanTopology, tmp_path, name: str, model, blocks: str) -> tuple[Process, str]:
    process = Process(
        lan,
        name,
        [
            "-m",
            "swarm.serve",
            "--model",
            str(model),
            "--blocks",
            blocks,
            "--host",
            lan.ips[name],
            "--throughput",
            "100",
            "--identity",
            str(tmp_path / f"{name}.key"),
            "--mdns",
        ],
        tmp_path / f"{name}.log",
    )
    online = process.line(lambda line: line.startswith("swarm.serve online:"))
    return process, online.split(" peer ")[1].split(",")[0]


def test_servers_and_a_client_on_one_lan_find_each_other_with_no_address_given(llama_path, llama_ref, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(llama_path)
    prompt = "Hello, LAN"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = llama_ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    expected_text = prompt + tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)

    with LanTopology(["a", "b", "c"]) as lan:
        # The first server finds nobody and starts the swarm; the second joins it through mDNS alone.
        first, first_id = _server(lan, tmp_path, "a", llama_path, "0:2")
        second, second_id = _server(lan, tmp_path, "b", llama_path, "2:4")
        try:
            second_log = (tmp_path / "b.log").read_text()
            assert "joining the swarm of 1 peer(s) found on the LAN" in second_log, second_log[-2000:]
            assert f"found peer {first_id} at /ip4/{lan.ips['a']}/tcp/" in second_log
            run = lan.run(
                "c",
                [
                    sys.executable,
                    "-m",
                    "client.generate",
                    "--model",
                    str(llama_path),
                    "--mdns",
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    "8",
                    "--log-level",
                    "info",
                ],
                timeout=300,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            assert run.returncode == 0, run.stderr[-3000:]
            assert run.stdout.rstrip("\n") == expected_text
            assert "mDNS: found peer" in run.stderr
        finally:
            for server in (second, first):
                server.kill(15)
        for server in (first, second):
            assert server.handle.returncode == 0, server.log.read_text()[-2000:]
