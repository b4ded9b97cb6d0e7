"""Tokens/s through a server behind NAT (reached through a bridge) against a direct one.

Builds the NAT test's network namespaces (root, `ip`, `iptables`): a public network with a
bootstrap node (the bridge), a server of blocks [0, L/2) and the client, and a home network behind a
masquerading router. The second half of the blocks is served first by a home server (bridged),
then by a public server of the same blocks (direct; the home one stops cleanly). The client times
--tokens greedy tokens per run, --runs runs each, with push on, and checks that both outputs agree.

Prints one JSON object. Example:
  sudo .venv/bin/python bench/nat.py --runs 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLIENT = r"""
import json, sys, time
import torch
from client import AutoDistributedModelForCausalLM

path, peers, want_bridged = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1"
runs, tokens = int(sys.argv[4]), int(sys.argv[5])
with AutoDistributedModelForCausalLM.from_pretrained(path, peers, request_timeout=60) as model:
    remote = model.remote
    deadline = time.monotonic() + 240
    while True:  # until the second half is served only as this run wants (bridged or direct)
        servers = remote.runtime.run(remote.dht.fetch_servers(remote.model_name, remote.num_blocks), 60)
        last = [info for info in servers[-1].values() if info.record.state.value == "online"]
        record = last[0].record if len(last) == 1 else None
        if record is not None and bool(record.bridge_addrs) == want_bridged and record.reachable != want_bridged:
            break
        assert time.monotonic() < deadline, "the swarm never looked as this run wants"
        time.sleep(1)
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=4)  # warm-up: connections, pings, caches
    rates, output = [], None
    for _ in range(runs):
        started = time.perf_counter()
        output = model.generate(ids, max_new_tokens=tokens)
        rates.append(tokens / (time.perf_counter() - started))
    rtts = remote.pings.rtts()
    rtt_ms = {p[-6:]: round(r * 1000, 2) for p, r in rtts.items()}
    print(json.dumps({"rates": rates, "output": output[0].tolist(), "rtt_ms": rtt_ms}), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="blocks of the random Llama")
    parser.add_argument("--hidden", type=int, default=256, help="its hidden size")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per setup")
    args = parser.parse_args()

    from tests.helpers.netns import HOME_IP, PUBLIC_IP, NatTopology, Process, start_bootstrap, start_server

    why_not = NatTopology.unavailable()
    if why_not:
        print(json.dumps({"error": f"cannot build the NAT: {why_not}"}))
        return 2
    from blocks.synthetic import make_random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="swarm-bench-nat-"))
    model = make_random_checkpoint(work / "llama", "llama", num_layers=args.layers, hidden_size=args.hidden, seed=3)
    half = f"{args.layers // 2}:{args.layers}"
    processes: list[Process] = []
    results = {}
    with NatTopology() as nat:
        try:
            boot, addr = start_bootstrap(nat, work, "bootstrap", 31500, [])
            processes.append(boot)
            first, _ = start_server(nat, work, "first", "public", PUBLIC_IP, model, f"0:{args.layers // 2}", [addr])
            processes.append(first)
            for name, where, host, bridged in (
                ("bridged", "home", HOME_IP, True),
                ("direct", "public", PUBLIC_IP, False),
            ):
                second, _ = start_server(nat, work, name, where, host, model, half, [addr])
                processes.append(second)
                client = Process(
                    nat,
                    "public",
                    ["-c", CLIENT, str(model), addr, "1" if bridged else "0", str(args.runs), str(args.tokens)],
                    work / f"client-{name}.log",
                )
                line = client.line(lambda text: text.startswith("{"), timeout=600)
                client.kill()
                results[name] = json.loads(line)
                second.kill(15, wait=False)  # SIGTERM: it drains, announced as such, then leaves
        finally:
            for process in reversed(processes):
                process.kill()
    bridged, direct = results["bridged"], results["direct"]
    print(
        json.dumps(
            {
                "model": f"random llama, {args.layers} blocks, hidden {args.hidden}, fp32, 2 servers, push on",
                "tokens_per_run": args.tokens,
                "direct_tokens_per_s": round(statistics.median(direct["rates"]), 2),
                "bridged_tokens_per_s": round(statistics.median(bridged["rates"]), 2),
                "bridged_over_direct": round(
                    statistics.median(bridged["rates"]) / statistics.median(direct["rates"]), 3
                ),
                "ping_rtt_ms": {"direct": direct["rtt_ms"], "bridged": bridged["rtt_ms"]},
                "outputs_equal": bridged["output"] == direct["output"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
