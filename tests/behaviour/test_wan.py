"""The WAN harness: a delay proxy that really delays, and nodes announced at addresses other than
their listen address (`--announce-maddrs`) that peers then dial."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from client import AutoDistributedModelForCausalLM
from dht.ports import free_port
from harness.delay_proxy import DelayProxy, DelayProxyProcess
from harness.local_swarm import LocalSwarm


async def test_the_delay_proxy_delays_each_direction_and_keeps_every_byte_in_order():
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = DelayProxy(server.sockets[0].getsockname()[1], delay=0.1)
    port = proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # every message crosses both legs, not just the first
            started = time.monotonic()
            writer.write(b"ping")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), timeout=30) == b"ping"
            assert time.monotonic() - started >= 0.2  # 0.1 s there, 0.1 s back
        payload = bytes(range(256)) * 8192  # 2 MiB
        writer.write(payload)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), timeout=60) == payload
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), timeout=30) == b""  # the end travels too
        writer.close()
        assert proxy.bytes_forwarded == 2 * (8 + len(payload))
    finally:
        proxy.close()
        server.close()


@pytest.mark.slow
def test_servers_behind_delay_proxies_are_dialed_at_their_announced_addresses(llama_path, llama_ref, tmp_path):
    delay_ms = 30
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(5))
    new_tokens = 6
    expected = llama_ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    with LocalSwarm(
        llama_path,
        [(0, 2), (2, 4)],
        server_args=["--throughput", "100"],
        workdir=tmp_path / "swarm",
        link_delay_ms=delay_ms,
    ) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            llama_path, swarm.initial_peers, request_timeout=60
        ) as model:
            remote = model.remote
            servers = remote.runtime.run(remote.dht.fetch_servers(model.model_name, remote.num_blocks), 30)
            announced = {info.peer_id: list(info.record.addrs) for block in servers for info in block.values()}
            for server, proxy in zip(swarm.servers, swarm.proxies):
                assert announced[server.peer_id] == [f"/ip4/127.0.0.1/tcp/{proxy.port}/p2p/{server.peer_id}"]
            before = [proxy.bytes_forwarded for proxy in swarm.proxies]
            model.generate(ids, max_new_tokens=1)  # sessions are open and connections made
            started = time.monotonic()
            output = model.generate(ids, max_new_tokens=new_tokens)
            elapsed = time.monotonic() - started
        assert torch.equal(output, expected)
        assert all(proxy.bytes_forwarded > count for proxy, count in zip(swarm.proxies, before))
        # Each token crosses each of the 2 servers' links twice (there and back): at least 4 × 30 ms.
        assert elapsed >= new_tokens * 4 * delay_ms / 1000


def test_a_bootstrap_node_prints_its_announced_address():
    proxy = DelayProxyProcess(free_port(), delay=0.0)
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bootstrap",
                "--host",
                "127.0.0.1",
                "--port",
                str(proxy.target_port),
                "--announce-maddrs",
                f"/ip4/127.0.0.1/tcp/{proxy.port}",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = process.stdout.readline()
            assert line.startswith(f"/ip4/127.0.0.1/tcp/{proxy.port}/p2p/"), line
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        proxy.close()


def test_a_bootstrap_node_with_a_public_ip_announces_it_and_a_bad_one_is_refused():
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bootstrap",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--public-ip",
            "127.0.0.2",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"/ip4/127.0.0.2/tcp/{port}/p2p/"), line  # announced, not the listen address
    finally:
        process.terminate()
        process.wait(timeout=60)
    refused = subprocess.run(
        [sys.executable, "-m", "bootstrap", "--public-ip", "203.0.113"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert refused.returncode == 2 and "public_ip" in refused.stderr.replace("-", "_")
