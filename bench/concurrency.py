"""Many users at once: aggregate tokens/s of concurrent sessions through one server chain.

One session alone, then 4 and 16 at once (different prompts), as threads of one client process
(as the relay runs them) or as separate client processes. Reports aggregate tokens/s, per-session
p50/p99 time per token and time to first token, whether every session's output equals
single-process `transformers` on the same prompt, the servers' resident memory at step 10 and
step 1000 of a long session, and the memory roofline of one session's decode step (what it must
read over a large copy's bandwidth, measured in the same run) with the share of it that the one
session reaches. Each count of sessions is also compared with single-process `transformers`
generating the same prompts as one left-padded batch, timed right after it: the ceiling batching
aims at. With threads, also the rows per product of the client's shared LM head
(`head_rows_per_product`), beside the servers' steps per round, and the checks the client's local
referee computes per turn (`referee_claims_per_turn`), and the share of the machine's cores that the
client, servers and daemons kept busy over the round (`machine_busy_share`: 1.0 is every core all
the time; well below it, the sessions wait on latency rather than compute). Prints one JSON object.
Examples:
  .venv/bin/python bench/concurrency.py                      # random Llama 768 × 8, 2 servers, threads
  .venv/bin/python bench/concurrency.py --clients processes  # 16 client processes instead
"""

from __future__ import annotations

import collections
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # threads stay awake within a step (harness/processes.py)

import psutil  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    add_model_flags,
    bench_model,
    bench_parser,
    memory_bandwidth,
    roofline,
    work_folder,
)
from blocks.checkpoint import Checkpoint  # noqa: E402
from blocks.loading import load_head, load_span  # noqa: E402
from blocks.span import SpanInput  # noqa: E402
from client import AutoDistributedModelForCausalLM, TokenClock  # noqa: E402
from harness.local_swarm import LocalSwarm, even_splits  # noqa: E402

SOLO_REPEATS = 5  # one session alone, and single-process transformers: the median of this many runs each


def prompts(count: int, vocab: int) -> list[torch.Tensor]:
    """Different prompts of different lengths (8 to 38 tokens)."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (1, 8 + (index * 7) % 31), generator=generator) for index in range(count)]


def batched_tokens_per_s(reference, batch: list[torch.Tensor], new_tokens: int) -> float:
    """Single-process transformers generating `batch` as one left-padded batch: the ceiling batching
    aims at (the weights are read once per step for every row)."""
    width = max(ids.shape[1] for ids in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - prompt.shape[1] :] = prompt[0]
        mask[row, width - prompt.shape[1] :] = 1
    with torch.no_grad():
        start = time.perf_counter()
        reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return len(batch) * new_tokens / (time.perf_counter() - start)


def run_one(model, ids: torch.Tensor, new_tokens: int) -> dict:
    clock = TokenClock()
    output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "output": output,
        "started": clock.started,
        "finished": clock.times[-1],
        "ttft": clock.times[0] - clock.started,
        "gaps": gaps,
    }


class CpuMeter:
    """CPU seconds spent by the client, the servers and the libp2p daemons (where the cores go)."""

    def __init__(self, swarm: LocalSwarm):
        me = psutil.Process()
        servers = [psutil.Process(server.proc.pid) for server in swarm.servers]
        helpers = [child for proc in servers for child in proc.children(recursive=True)]
        helpers += [child for child in me.children(recursive=True) if child.name() == "p2pd"]
        self.groups = {"client": [me], "servers": servers, "daemons_and_dht": helpers}
        self.start = self._read()
        self.started = time.perf_counter()

    def _read(self) -> dict[str, float]:
        totals = {}
        for name, procs in self.groups.items():
            totals[name] = sum(sum(proc.cpu_times()[:2]) for proc in procs)
        return totals

    def seconds(self) -> dict[str, float]:
        now = self._read()
        return {name: round(now[name] - self.start[name], 2) for name in now}

    def busy_share(self) -> float:
        """CPU seconds of every group over the cores' seconds since the meter started."""
        cores = len(os.sched_getaffinity(0))
        return round(sum(self.seconds().values()) / ((time.perf_counter() - self.started) * cores), 2)


def steps_per_round(swarm: LocalSwarm) -> list[float]:
    """Each server's (steps, rounds) so far, from its `swarm_batch_steps` histogram."""
    counts = []
    for server in swarm.servers:
        text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
        samples = {
            sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
        }
        counts.append((samples.get("swarm_batch_steps_sum", 0.0), samples.get("swarm_batch_steps_count", 0.0)))
    return counts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(runs: list[dict], references: list[torch.Tensor], new_tokens: int) -> dict:
    wall = max(run["finished"] for run in runs) - min(run["started"] for run in runs)
    gaps = [gap for run in runs for gap in run["gaps"]]
    return {
        "sessions": len(runs),
        "aggregate_tokens_per_s": round(len(runs) * new_tokens / wall, 2),
        "time_per_token_ms_p50": round(1000 * statistics.median(gaps), 1),
        "time_per_token_ms_p99": round(1000 * percentile(gaps, 0.99), 1),
        "ttft_ms_p50": round(1000 * statistics.median(run["ttft"] for run in runs), 1),
        "ttft_ms_max": round(1000 * max(run["ttft"] for run in runs), 1),
        "identical_outputs": all(torch.equal(run["output"], ref) for run, ref in zip(runs, references)),
    }


def threads_round(model, batch: list[torch.Tensor], new_tokens: int) -> list[dict]:
    results: list[dict] = [{}] * len(batch)

    def work(index: int) -> None:
        results[index] = run_one(model, batch[index], new_tokens)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def processes_round(args, path: Path, peers: list[str], batch: list[torch.Tensor], workdir: Path) -> list[dict]:
    """Each session in its own client process; they start generating together once all are connected."""
    go = workdir / "go"
    go.unlink(missing_ok=True)
    procs = []
    for index, ids in enumerate(batch):
        torch.save(ids, workdir / f"prompt{index}.pt")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(path),
                    str(workdir / f"prompt{index}.pt"),
                    str(go),
                    str(args.new_tokens),
                    "no-push" if args.no_push else "push",
                    str(args.verify),
                    *peers,
                ],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )
    while not all((workdir / f"prompt{index}.pt.ready").exists() for index in range(len(batch))):
        if any(proc.poll() not in (None, 0) for proc in procs):
            raise RuntimeError("a client process failed")
        time.sleep(0.1)
    go.touch()
    for proc in procs:
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError("a client process failed")
    return [torch.load(workdir / f"prompt{index}.pt.result", weights_only=False) for index in range(len(batch))]


def worker(path: str, prompt: str, go: str, new_tokens: str, push: str, verify: str, *peers: str) -> None:
    ids = torch.load(prompt)
    with AutoDistributedModelForCausalLM.from_pretrained(
        path, list(peers), push=push == "push", verify=float(verify)
    ) as model:
        model.generation_config.eos_token_id = None
        model.generate(ids, max_new_tokens=2, do_sample=False)
        Path(prompt + ".ready").touch()
        while not Path(go).exists():
            time.sleep(0.01)
        torch.save(run_one(model, ids, int(new_tokens)), prompt + ".result")


def compute_floor(checkpoint: Checkpoint, splits: list[tuple[int, int]], threads: int, sessions: int) -> dict:
    """Milliseconds of pure compute per token, in this process with the servers' thread count: each
    server's span for one session's one-token step and for `sessions` sessions' steps in one round
    (each with a 32-token cache in a KV pool, as servers keep them), and the LM head for 1 and
    `sessions` rows. No RPC, no Python of the client or the server loop: what no scheduling can go
    below on this machine."""
    torch.set_num_threads(threads)
    hidden = checkpoint.hidden_size
    head = load_head(checkpoint)

    def median_ms(work, repeats: int = 15) -> float:
        work()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return 1000 * statistics.median(times)

    one, many = 0.0, 0.0
    with torch.inference_mode():
        for start, end in splits:
            span = load_span(checkpoint, start, end)
            pool = span.new_pool(sessions * 96)  # the servers' KV pool, a slice per session
            caches = [pool.allocate(1, 96) for _ in range(sessions)]
            for cache in caches:
                span.forward(torch.randn(1, 32, hidden), cache=cache)
            one += median_ms(lambda: span.forward(torch.randn(1, 1, hidden), cache=caches[0]))
            many += median_ms(
                lambda: span.forward_batch([SpanInput(torch.randn(1, 1, hidden), cache) for cache in caches])
            )
        head_one = median_ms(lambda: head.logits(torch.randn(1, 1, hidden)))
        head_many = median_ms(lambda: head.logits(torch.randn(sessions, 1, hidden)))
    return {
        "sessions": sessions,
        "servers_one_step_ms": round(one, 1),
        "servers_round_ms": round(many, 1),
        "head_one_row_ms": round(head_one, 1),
        "head_all_rows_ms": round(head_many, 1),
        # per token, with the head shared (threads of one client) or one head per client process
        "threads_ms_per_token": round((many + head_many) / sessions, 2),
        "processes_ms_per_token": round(many / sessions + head_one, 2),
    }


def referee_counts(model) -> tuple[int, int]:
    """(claims, turns) the client's local referee has computed so far ((0, 0) with checks off)."""
    verifier = model.remote.audit.verifier
    if verifier is None or verifier.referee is None:
        return 0, 0
    return verifier.referee.claims, verifier.referee.batches


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def memory_over_a_long_session(model, swarm: LocalSwarm, vocab: int, steps: int) -> dict:
    pids = [server.proc.pid for server in swarm.servers]
    seen: dict[int, list[float]] = {}

    def on_token(count: int) -> None:
        if count in (10, steps):
            seen[count] = [rss_mib(pid) for pid in pids]

    ids = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(2))
    model.generate(ids, max_new_tokens=steps, do_sample=False, streamer=TokenClock(on_token))
    return {
        "steps": steps,
        "server_rss_mib_at_step_10": [round(value, 1) for value in seen[10]],
        f"server_rss_mib_at_step_{steps}": [round(value, 1) for value in seen[steps]],
        "max_change_percent": round(max(100 * abs(b - a) / a for a, b in zip(seen[10], seen[steps])), 2),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
        return
    parser = bench_parser(__doc__)
    add_model_flags(parser, hidden=768, layers=8, heads=12, intermediate=2048, vocab=32000, positions=4096)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--sessions", type=int, nargs="+", default=[4, 16], help="concurrent sessions to measure")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", choices=["threads", "processes"], default="threads")
    parser.add_argument("--server-threads", type=int, default=os.cpu_count() or 1, help="torch threads per server")
    parser.add_argument("--memory-steps", type=int, default=1000, help="length of the long session (0: skip)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra swarm.serve flag (repeatable)")
    parser.add_argument("--no-push", action="store_true", help="clients relay every span's output themselves")
    parser.add_argument(
        "--verify",
        type=float,
        default=0.05,
        help="the clients' spot-check rate (default 0.05, the client's default; 0: off)",
    )
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")

    workdir = work_folder("concurrency")
    path = bench_model(args, workdir)
    checkpoint = Checkpoint(path)
    all_prompts = prompts(max(args.sessions), args.vocab)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    params = sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        references = [reference.generate(ids, max_new_tokens=args.new_tokens, do_sample=False) for ids in all_prompts]

    splits = even_splits(checkpoint.num_blocks, args.servers)
    report: dict = {
        "model": "random-llama",
        "parameters_m": round(params / 1e6, 1),
        "layers": checkpoint.num_blocks,
        "hidden_size": args.hidden,
        "servers": len(splits),
        "clients": args.clients,
        "new_tokens": args.new_tokens,
        "server_threads": args.server_threads,
        "push": not args.no_push,
        "verify": args.verify,
    }
    floor = compute_floor(checkpoint, splits, args.server_threads, max(args.sessions))
    torch.set_num_threads(os.cpu_count() or 1)
    server_args = ["--throughput", "1", "--max-length", "2048", *args.server_arg]
    with LocalSwarm(
        path,
        splits,
        server_args=server_args,
        workdir=workdir / "swarm",
        env={"OMP_NUM_THREADS": str(args.server_threads)},
    ) as swarm:
        with AutoDistributedModelForCausalLM.from_pretrained(
            path, swarm.initial_peers, push=not args.no_push, verify=args.verify
        ) as model:
            model.generation_config.eos_token_id = None
            model.generate(all_prompts[0], max_new_tokens=4, do_sample=False)
            solos, local_rates, cpu = [], [], collections.Counter()
            for _ in range(SOLO_REPEATS):  # in turns with single-process runs: the machine's speed drifts
                meter = CpuMeter(swarm)
                solos.append(
                    summarize([run_one(model, all_prompts[0], args.new_tokens)], references[:1], args.new_tokens)
                )
                cpu.update(meter.seconds())
                with torch.no_grad():
                    local = run_one(reference, all_prompts[0], args.new_tokens)
                local_rates.append(args.new_tokens / (local["finished"] - local["started"]))
            solo = sorted(solos, key=lambda run: run["aggregate_tokens_per_s"])[SOLO_REPEATS // 2]
            solo["cpu_seconds"] = {name: round(value / SOLO_REPEATS, 2) for name, value in cpu.items()}
            local_rate = statistics.median(local_rates)
            report["single_process_tokens_per_s"] = round(local_rate, 2)
            report["one_session"] = solo
            report["one_session_ratio_to_single_process"] = round(solo["aggregate_tokens_per_s"] / local_rate, 3)
            for count in args.sessions:
                batch = all_prompts[:count]
                meter = CpuMeter(swarm)
                batching = steps_per_round(swarm)
                products, rows = model.head.products, model.head.rows
                referee = referee_counts(model)
                if args.clients == "threads":
                    runs = threads_round(model, batch, args.new_tokens)
                else:
                    runs = processes_round(args, path, swarm.initial_peers, batch, workdir)
                summary = summarize(runs, references[:count], args.new_tokens)
                summary["cpu_seconds"] = meter.seconds()
                summary["server_steps_per_round"] = [
                    round((steps - steps0) / max(rounds - rounds0, 1), 2)
                    for (steps, rounds), (steps0, rounds0) in zip(steps_per_round(swarm), batching)
                ]
                if args.clients == "threads":  # the client's shared LM head: rows per product
                    summary["head_rows_per_product"] = round(
                        (model.head.rows - rows) / max(model.head.products - products, 1), 2
                    )
                    summary["machine_busy_share"] = meter.busy_share()  # 16 client processes are not counted
                    claims, turns = (now - before for now, before in zip(referee_counts(model), referee))
                    if turns:
                        summary["referee_claims_per_turn"] = round(claims / turns, 2)
                summary["speedup_over_one_session"] = round(
                    summary["aggregate_tokens_per_s"] / solo["aggregate_tokens_per_s"], 2
                )
                # the same prompts as one batch in one process, timed right after (the machine drifts)
                batched = batched_tokens_per_s(reference, batch, args.new_tokens)
                summary["batched_single_process_tokens_per_s"] = round(batched, 2)
                summary["ratio_to_batched_single_process"] = round(summary["aggregate_tokens_per_s"] / batched, 3)
                report[f"sessions_{count}"] = summary
            # The most batching could give on this machine if every step cost only its compute (rounds
            # always full, no RPC or Python anywhere), against the one session measured above.
            solo_ms = 1000 / solo["aggregate_tokens_per_s"]
            report["compute_floor"] = floor | {
                "ceiling_over_one_session_threads": round(solo_ms / floor["threads_ms_per_token"], 2),
                "ceiling_over_one_session_processes": round(solo_ms / floor["processes_ms_per_token"], 2),
            }
            position = all_prompts[0].shape[1] + args.new_tokens // 2  # the one session's middle step
            bound = roofline(checkpoint, torch.float32, position, memory_bandwidth())
            report["roofline"] = bound | {
                "one_session_roofline_fraction": round(
                    bound["roofline_ms_per_output_token"] / solo["time_per_token_ms_p50"], 3
                )
            }
            if args.memory_steps:
                report["memory"] = memory_over_a_long_session(model, swarm, args.vocab, args.memory_steps)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
