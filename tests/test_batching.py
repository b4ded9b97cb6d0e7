"""Continuous batching and the KV pool: sessions computed together get what they would get alone, and
the server's memory is the pool it allocated at start, however long or many the sessions."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import psutil
import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from blocks.checkpoint import Checkpoint
from blocks.loading import load_head, load_span
from blocks.span import SpanInput
from blocks.synthetic import make_random_checkpoint
from client import AutoDistributedModelForCausalLM
from client.shared_head import SharedHead
from harness.local_swarm import LocalSwarm
from swarm.batching import StepScheduler
from swarm.compute import ComputeThread
from tests.conftest import reference_model
from tests.test_relay_metrics import values

# Packing rows into one matrix product may change the last bits of a float sum; nothing more.
ATOL = 1e-5


def solo(span, hiddens, masks):
    """Each step of one sequence run alone through the span with the growing cache of transformers' kind."""
    cache = span.new_cache()
    return [span.forward(hidden, cache, mask) for hidden, mask in zip(hiddens, masks)]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_packed_batch_of_sessions_matches_each_session_alone(request, name):
    """Sessions at different positions, with different batch sizes, prompt lengths and left padding,
    joining and leaving between rounds, computed as one batch per round."""
    path = request.getfixturevalue(f"{name}_path")
    span = load_span(Checkpoint(path), 0, 3, torch.float32, "cpu")
    pool = span.new_pool(4096)
    size = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    # (batch, prompt tokens, left padding of the first row, round it joins in, decode steps)
    plans = [(1, 7, 0, 0, 6), (2, 3, 2, 0, 4), (3, 12, 5, 1, 5), (1, 1, 0, 2, 3), (2, 9, 0, 3, 2)]
    sessions = []
    for batch, prompt, padding, joins, steps in plans:
        hiddens = [torch.randn(batch, prompt, size, generator=generator)]
        hiddens += [torch.randn(batch, 1, size, generator=generator) for _ in range(steps)]
        mask = torch.ones(batch, prompt + steps, dtype=torch.int64)
        mask[0, :padding] = 0
        masks = [mask[:, : prompt + i] if padding else None for i in range(steps + 1)]
        sessions.append(
            {"hiddens": hiddens, "masks": masks, "joins": joins, "cache": pool.allocate(batch, 64), "outputs": []}
        )
    expected = [solo(span, s["hiddens"], s["masks"]) for s in sessions]

    for round_index in range(12):
        active = [s for s in sessions if s["joins"] <= round_index and len(s["outputs"]) < len(s["hiddens"])]
        if not active:
            break
        inputs = [SpanInput(s["hiddens"][len(s["outputs"])], s["cache"], s["masks"][len(s["outputs"])]) for s in active]
        for s, output in zip(active, span.forward_batch(inputs)):
            s["outputs"].append(output)
        for s in sessions:  # a session that is done leaves, and its slots go back to the pool
            if len(s["outputs"]) == len(s["hiddens"]) and s["cache"] is not None:
                s["cache"].release()
                s["cache"] = None
    for s, want in zip(sessions, expected):
        assert len(s["outputs"]) == len(want)
        for got, ref in zip(s["outputs"], want):
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert pool.largest_free_run() == 4096


async def test_the_scheduler_batches_concurrent_steps_and_chunks_a_long_prompt_between_decoders(llama_path):
    span = load_span(Checkpoint(llama_path), 0, 4, torch.float32, "cpu")
    pool = span.new_pool(1024)
    size = span.config.hidden_size
    compute = ComputeThread()
    scheduler = StepScheduler(compute, max_batch_tokens=8)
    generator = torch.Generator().manual_seed(1)
    try:
        # Six decoders with a little history each, and one 20-token prompt: 3 chunks of at most 8 tokens.
        decoders = []
        for _ in range(6):
            cache = pool.allocate(1, 32)
            history = torch.randn(1, 4, size, generator=generator)
            await scheduler.run(span, history, cache, None, 0, 4)
            step = torch.randn(1, 1, size, generator=generator)
            reference_cache = span.new_cache()
            span.forward(history, reference_cache)
            decoders.append((cache, step, span.forward(step, reference_cache)))
        prompt = torch.randn(1, 20, size, generator=generator)
        prompt_cache = pool.allocate(1, 32)
        rounds_before = scheduler.rounds
        finished: list[str] = []

        async def decode(index, cache, step):
            output = await scheduler.run(span, step, cache, None, 0, 4)
            finished.append(f"decoder {index}")
            return output

        async def prefill():
            output = await scheduler.run(span, prompt, prompt_cache, None, 0, 4)
            finished.append("prompt")
            return output

        results = await asyncio.wait_for(
            asyncio.gather(prefill(), *(decode(i, cache, step) for i, (cache, step, _) in enumerate(decoders))),
            timeout=60,
        )
        torch.testing.assert_close(results[0], span.forward(prompt, span.new_cache()), atol=ATOL, rtol=0)
        for output, (_, _, want) in zip(results[1:], decoders):
            torch.testing.assert_close(output, want, atol=ATOL, rtol=0)
        # 7 steps (26 tokens) in 4 rounds at most: the decoders rode along with the prompt's chunks,
        # and every decoder was done before the prompt's last chunk.
        assert scheduler.rounds - rounds_before <= 4
        assert finished[-1] == "prompt"
        assert prompt_cache.length(0) == 20

        # A step whose cache is gone fails alone; the others in its round still get their answers.
        broken = pool.allocate(1, 32)
        broken.release()
        good_cache = pool.allocate(1, 32)
        step = torch.randn(1, 3, size, generator=generator)
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                scheduler.run(span, step, broken, None, 0, 4),
                scheduler.run(span, step, good_cache, None, 0, 4),
                return_exceptions=True,
            ),
            timeout=60,
        )
        assert isinstance(outcomes[0], RuntimeError) and "given back" in str(outcomes[0])
        torch.testing.assert_close(outcomes[1], span.forward(step, span.new_cache()), atol=ATOL, rtol=0)
    finally:
        scheduler.close()
        compute.shutdown()


class TokenClock(BaseStreamer):
    """Calls `on_token(n)` after the n-th new token (the prompt is the first put)."""

    def __init__(self, on_token):
        self.on_token, self.puts = on_token, 0

    def put(self, value):
        self.puts += 1
        if self.puts > 1:
            self.on_token(self.puts - 1)

    def end(self):
        pass


def scrape(metrics_url: str, name: str) -> dict[tuple, float]:
    """Samples `name` of a server's /metrics, by their labels."""
    return values(urllib.request.urlopen(metrics_url, timeout=30).read().decode(), name)


def batched_steps(metrics_url: str) -> float:
    """How many steps the server computed in rounds of two or more (from its Prometheus histogram)."""
    alone = sum(v for labels, v in scrape(metrics_url, "swarm_batch_steps_bucket").items() if ("le", "1.0") in labels)
    return sum(scrape(metrics_url, "swarm_batch_steps_sum").values()) - alone


@pytest.mark.slow
def test_concurrent_sessions_are_batched_and_each_equals_transformers(llama_swarm, llama_path, llama_ref):
    """Threads of one client, as the relay runs them: different prompt lengths and batch sizes, a
    left-padded batch, sessions starting while others are midway."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for index in range(8):
        batch = 1 + index % 3
        ids = torch.randint(3, 100, (batch, 4 + 3 * index), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1 and index % 2:
            mask[0, :3] = 0  # left padding
        cases.append((ids, mask, 12 + index))
    expected = [
        llama_ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False) for ids, mask, new in cases
    ]
    before = [batched_steps(server.metrics_url) for server in llama_swarm.servers]
    results: list = [None] * len(cases)
    halfway = [threading.Event() for _ in cases]

    def run(index):
        ids, mask, new = cases[index]
        if index >= 4:
            halfway[index - 4].wait(timeout=120)  # joins while another session is midway

        def on_token(n):
            if n == new // 2:
                halfway[index].set()

        try:
            results[index] = llama_client_model.generate(
                ids, attention_mask=mask, max_new_tokens=new, streamer=TokenClock(on_token)
            )
        except Exception as e:
            results[index] = e
        finally:
            halfway[index].set()

    with AutoDistributedModelForCausalLM.from_pretrained(
        llama_path, llama_swarm.initial_peers, request_timeout=60
    ) as llama_client_model:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(cases))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    for result, want in zip(results, expected):
        assert isinstance(result, torch.Tensor), result
        assert torch.equal(result, want)
    after = [batched_steps(server.metrics_url) for server in llama_swarm.servers]
    assert any(b > a for a, b in zip(before, after)), "no server computed two sessions' steps together"


@pytest.mark.slow
def test_one_session_fails_over_while_the_others_go_on(tmp_path):
    path = make_random_checkpoint(tmp_path / "llama", "llama", num_layers=4, seed=11)
    ref = reference_model(path)
    prompts = [torch.randint(3, 100, (1, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [ref.generate(ids, max_new_tokens=30, do_sample=False) for ids in prompts]
    with LocalSwarm(
        path, [(0, 2), (2, 4), (2, 4)], server_args=["--throughput", "100"], workdir=tmp_path / "swarm"
    ) as swarm:
        # A stream to a killed server sometimes sees no reset and waits out its timeout: keep it short.
        # A healthy server taken for a dead one on a slow day only means one more failover here.
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=15) as model:
            results: list = [None] * len(prompts)
            killed = threading.Event()
            sessions = [model.inference_session(max_length=ids.shape[1] + 30) for ids in prompts]

            def kill_last_span_of_session_0(n):
                if n == 10 and not killed.is_set():
                    killed.set()
                    swarm.server(sessions[0].chain[-1][0]).kill()

            def run(index):
                try:
                    with sessions[index] as session:
                        streamer = TokenClock(kill_last_span_of_session_0 if index == 0 else lambda n: None)
                        results[index] = model.generate(
                            prompts[index], max_new_tokens=30, session=session, streamer=streamer
                        )
                except Exception as e:
                    results[index] = e

            threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
    assert killed.is_set()
    for result, want in zip(results, expected):
        assert isinstance(result, torch.Tensor), result
        assert torch.equal(result, want)
    assert sessions[0].failovers >= 1


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.mark.slow
def test_server_memory_stays_flat_over_a_long_session_and_hundreds_of_sessions(tmp_path):
    """Keys and values of 1000 tokens are 64 MiB on this server (wide heads on purpose), a fifth of its
    memory: a cache that grew with the session would show; the pool allocated at start does not."""
    path = make_random_checkpoint(
        tmp_path / "wide",
        "llama",
        hidden_size=64,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        head_dim=256,
        max_position_embeddings=2048,
        seed=3,
    )
    ref = reference_model(path)
    ref.generation_config.eos_token_id = None
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = ref.generate(ids, max_new_tokens=1000, do_sample=False)
    assert expected.shape[1] == 1006
    # Rounds of at most 64 tokens: the activations of one round (the allocator's high-water mark) stay
    # far below the 5 % this test allows, whichever sessions happen to meet in a round.
    with LocalSwarm(
        path,
        [(0, 4)],
        server_args=["--throughput", "100", "--cache-tokens", "2048", "--max-batch-tokens", "64"],
        workdir=tmp_path / "swarm",
    ) as swarm:
        pid = swarm.servers[0].proc.pid
        seen = {}
        with AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, request_timeout=60) as model:
            model.generation_config.eos_token_id = None

            def on_token(n):
                if n in (10, 1000):
                    seen[n] = rss_mib(pid)

            output = model.generate(ids, max_new_tokens=1000, streamer=TokenClock(on_token))
            assert torch.equal(output, expected)
            assert abs(seen[1000] - seen[10]) <= 0.05 * seen[10], seen

            def wave(sessions_per_thread):
                def short_sessions(seed):
                    prompt = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(seed))
                    for _ in range(sessions_per_thread):
                        model.generate(prompt, max_new_tokens=2)

                threads = [threading.Thread(target=short_sessions, args=(seed,)) for seed in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=300)

            # The first wave of concurrent sessions sets the allocator's high-water mark (thread arenas,
            # batch-sized activations): measured here, about 35 MiB, once. Then 208 more sessions.
            wave(10)
            before = rss_mib(pid)
            wave(13)
            wave(13)
            assert abs(rss_mib(pid) - before) <= 0.05 * before


def test_concurrent_lm_head_calls_of_one_client_share_one_product(llama_path):
    real = load_head(Checkpoint(llama_path))
    started, release = threading.Event(), threading.Event()

    class FirstCallWaits:
        """The real head, whose first call waits until the others have queued behind it."""

        calls: list[int] = []

        def logits(self, hidden):
            self.calls.append(hidden.shape[0])
            if len(self.calls) == 1:
                started.set()
                release.wait(timeout=30)
            return real.logits(hidden)

    head = SharedHead(FirstCallWaits())
    generator = torch.Generator().manual_seed(4)
    rows = [torch.randn(n, real.lm_head.in_features, generator=generator) for n in (1, 2, 1, 3)]
    results: list = [None] * len(rows)

    def call(index):
        results[index] = head.logits(rows[index])

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(timeout=30)
    others = [threading.Thread(target=call, args=(index,)) for index in range(1, len(rows))]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 30
    while len(head.queued()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(timeout=30)
    assert FirstCallWaits.calls == [1, 6]  # the three callers that queued went together
    for hidden, got in zip(rows, results):
        torch.testing.assert_close(got, real.logits(hidden), atol=ATOL, rtol=0)
