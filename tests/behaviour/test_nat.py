"""The NAT that issue 12's tests run behind: built from network namespaces, and really a NAT."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.netns import HOME_IP, PUBLIC_IP, ROUTER_PUBLIC_IP, NatTopology

WHY_NOT = NatTopology.unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

LISTEN = """
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], int(sys.argv[2])))
server.listen()
print("listening", flush=True)
connection, peer = server.accept()
print(peer[0], flush=True)
"""

DIAL = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as e:
    print("failed", type(e).__name__)
"""


def listen(nat: NatTopology, where: str, host: str, port: int) -> subprocess.Popen:
    process = nat.popen(where, [sys.executable, "-c", LISTEN, host, str(port)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "listening"
    return process


def dial(nat: NatTopology, where: str, host: str, port: int) -> str:
    return nat.run(where, [sys.executable, "-c", DIAL, host, str(port)], capture_output=True, text=True).stdout.strip()


def test_home_dials_out_through_the_masquerade_and_nobody_dials_in():
    with NatTopology() as nat:
        public = listen(nat, "public", PUBLIC_IP, 9000)
        assert dial(nat, "home", PUBLIC_IP, 9000) == "connected"
        # The public side sees the router's address, not the home's: the router masquerades.
        assert public.communicate(timeout=30)[0].strip() == ROUTER_PUBLIC_IP

        home = listen(nat, "home", "0.0.0.0", 9001)
        try:
            assert dial(nat, "public", HOME_IP, 9001).startswith("failed")  # no route to the home network
            assert dial(nat, "public", ROUTER_PUBLIC_IP, 9001).startswith("failed")  # no port is forwarded
            # Even a public host that routes the home range through the router gets nothing in.
            nat.run("public", ["ip", "route", "add", "192.168.77.0/24", "via", ROUTER_PUBLIC_IP], check=True)
            assert dial(nat, "public", HOME_IP, 9001) == "failed TimeoutError"
        finally:
            home.kill()
            home.wait(timeout=30)
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in leftover for name in nat.namespaces.values())
