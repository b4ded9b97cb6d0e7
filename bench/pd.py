"""Prefill/decode disaggregation: decode sessions' time per output token while long prompts arrive.

Two servers hold every block, either as `--role prefill` and `--role decode` ("roles") or both
`mixed` ("no roles"), timed in turns in one run. `--decode-sessions` sessions (threads of one
client) generate `--decode-tokens` tokens each; in the busy runs, `--prompts` prompts of
`--prompt-tokens` tokens arrive one after another from another client meanwhile. Reports the
decode sessions' time per output token (TPOT, ms) p50 and p99 when idle and when busy, the busy/idle
p99 ratio per setting, how many sessions moved from the prefill server, and the prompt length from
which the client moves a prompt's KV rather than letting the decode server compute it, on this
machine's measured links and throughput. With `--pin` (at least two cores), each server runs on
cores of its own, as two machines would: the first server (the prefill one) on the first half of
the cores, the second and this process (the clients) on the rest, in both settings alike.
Prints one JSON object. Example:
  .venv/bin/python bench/pd.py                       # random Llama 512 × 8, 2 000-token prompts
  .venv/bin/python bench/pd.py --pin                 # each server on cores of its own
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_model_flags, bench_model, bench_parser, work_folder  # noqa: E402
from blocks.checkpoint import Checkpoint  # noqa: E402
from client import AutoDistributedModelForCausalLM, TokenClock  # noqa: E402
from client.disaggregation import prompt_goes_to_prefill  # noqa: E402
from harness.local_swarm import LocalSwarm  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def decode_gaps(model, sessions: int, tokens: int, vocab: int, during=None) -> list[float]:
    """Seconds between consecutive tokens of `sessions` concurrent generations (`during()` runs
    beside them, once they have all started)."""
    gaps: list[float] = []
    started = threading.Barrier(sessions + 1)
    lock = threading.Lock()

    def one(seed: int) -> None:
        ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(seed))
        clock = TokenClock(on_token=lambda count: started.wait() if count == 2 else None)
        model.generate(ids, max_new_tokens=tokens, streamer=clock)
        with lock:
            gaps.extend(later - earlier for earlier, later in zip(clock.times[2:], clock.times[3:]))

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(sessions)]
    for thread in threads:
        thread.start()
    started.wait()
    if during is not None:
        during()
    for thread in threads:
        thread.join()
    return gaps


def pin(pid: int, cores: set[int]) -> None:
    """Runs process `pid` and every process under it (its DHT, its libp2p daemon) on `cores` only."""
    process = psutil.Process(pid)
    for each in [process, *process.children(recursive=True)]:
        each.cpu_affinity(sorted(cores))
        for thread in each.threads():  # threads started already keep their own mask
            try:
                os.sched_setaffinity(thread.id, cores)
            except OSError:  # a thread that has ended since
                pass


def measure(args, model_path: Path, roles: bool) -> dict:
    vocab = Checkpoint(model_path).config.vocab_size
    blocks = Checkpoint(model_path).num_blocks
    with LocalSwarm(model_path, [], workdir=work_folder("pd")) as swarm:
        # One after the other: the second measures its bandwidth to the first, which the client's
        # choice to move a prompt reads (a server alone has nobody to measure it to).
        for role in ("prefill", "decode") if roles else ("mixed", "mixed"):
            swarm.add_server(0, blocks, "--role", role, "--cache-tokens", str(args.cache_tokens))
        if args.pin:
            cores = sorted(os.sched_getaffinity(0))
            half = len(cores) // 2
            # This process first: `pin` takes every process under it, and the servers are forked
            # from a child of it, so pinning it last would put the prefill server with the decode one.
            pin(os.getpid(), set(cores[half:]))
            pin(swarm.servers[0].proc.pid, set(cores[:half]))
            pin(swarm.servers[1].proc.pid, set(cores[half:]))
        # The prompts' client is loaded and warmed up before the decoding starts: what is timed is
        # the prompts arriving, not a client starting on the cores the decoding clients use.
        with (
            AutoDistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers, verify=0) as model,
            AutoDistributedModelForCausalLM.from_pretrained(model_path, swarm.initial_peers, verify=0) as other,
        ):
            moved = []
            # One prompt first (another seed): its routes and connections are not the prompts' cost.
            warm = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(99))
            other.generate(warm, max_new_tokens=2)

            def prompts() -> None:
                for seed in range(args.prompts):
                    ids = torch.randint(
                        3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(100 + seed)
                    )
                    with other.inference_session(max_length=args.prompt_tokens + 4) as session:
                        other.generate(ids, max_new_tokens=4, session=session)
                        moved.append(session.moves)

            idle = decode_gaps(model, args.decode_sessions, args.decode_tokens, vocab)
            busy = decode_gaps(model, args.decode_sessions, args.decode_tokens, vocab, during=prompts)
            routes = model.remote.runtime.run(model.remote.view.index(), 60)
            per_token_block = Checkpoint(model_path).kv_bytes_per_token(torch.float32)
            pays_from = next(
                (n for n in range(1, 1 << 16) if prompt_goes_to_prefill(routes, n, 1, per_token_block, blocks)),
                None,
            )
        figures = {
            "tpot_ms_idle_p50": round(1000 * percentile(idle, 0.5), 1),
            "tpot_ms_idle_p99": round(1000 * percentile(idle, 0.99), 1),
            "tpot_ms_busy_p50": round(1000 * percentile(busy, 0.5), 1),
            "tpot_ms_busy_p99": round(1000 * percentile(busy, 0.99), 1),
            "prompts_moved_from_prefill": sum(moved),
        }
        figures["busy_over_idle_p99"] = round(figures["tpot_ms_busy_p99"] / figures["tpot_ms_idle_p99"], 2)
        if roles:
            figures["disaggregation_pays_from_tokens"] = pays_from
        return figures


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=512, layers=8, vocab=32000, positions=4096, choose=True)
    parser.add_argument("--decode-sessions", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--cache-tokens", type=int, default=16384)
    parser.add_argument(
        "--pin", action="store_true", help="each server on cores of its own (the clients with the second)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_path = bench_model(args, work_folder("pd-model"))
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs at least two cores")
    result = {"model": str(model_path), "prompt_tokens": args.prompt_tokens, "pinned": args.pin}
    for roles in (False, True):
        result["roles" if roles else "no_roles"] = measure(args, model_path, roles)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
