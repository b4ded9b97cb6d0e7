"""The NAT test's client, run inside its public namespace (`python -m tests.helpers.nat_client …`).

Prints one JSON object per line: the home server's record once it announces two bridges; `paused` at
token PAUSE_AT of the generation, then waits for a line on stdin (the test kills a bridge meanwhile);
the generated ids; then, told the killed bridge's address on stdin, the home server's record once
it no longer lists that bridge.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers.generation.streamers import BaseStreamer

from client import AutoDistributedModelForCausalLM


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def home_record(model, home_id: str, accept, timeout: float = 180.0) -> dict:
    remote = model.remote
    deadline = time.monotonic() + timeout
    while True:
        servers = remote.runtime.run(remote.dht.fetch_servers(remote.model_name, remote.num_blocks), 60)
        for block in servers:
            info = block.get(home_id)
            if info is not None and accept(info.record):
                return {
                    "reachable": info.record.reachable,
                    "bridge_addrs": list(info.record.bridge_addrs),
                    "addrs": list(info.record.addrs),
                }
        if time.monotonic() > deadline:
            raise SystemExit(f"the home server's record never became what the test waits for in {timeout:.0f} s")
        time.sleep(1)


class PauseAt(BaseStreamer):
    def __init__(self, at: int):
        self.at, self.puts = at, 0

    def put(self, value):
        self.puts += 1
        if self.puts == self.at + 1:  # the prompt is the first put
            say(paused=self.at)
            sys.stdin.readline()

    def end(self):
        pass


def main() -> None:
    path, peers, home_id, pause_at, new_tokens, prompt = sys.argv[1:7]
    ids = torch.tensor([json.loads(prompt)])
    with AutoDistributedModelForCausalLM.from_pretrained(path, peers.split(","), request_timeout=30) as model:
        say(record=home_record(model, home_id, lambda record: len(record.bridge_addrs) >= 2))
        output = model.generate(ids, max_new_tokens=int(new_tokens), streamer=PauseAt(int(pause_at)))
        say(tokens=output[0].tolist())
        dead = sys.stdin.readline().strip()
        say(
            record_after=home_record(
                model, home_id, lambda record: record.bridge_addrs and dead not in record.bridge_addrs
            )
        )


if __name__ == "__main__":
    main()
