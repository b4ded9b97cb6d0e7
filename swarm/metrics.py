"""A server's Prometheus metrics, named as in the MindIE coordinator seed, and their `/metrics` page.

A "request" is one session (or stateless forward pass) a client opens on this server: its first step
is the prompt (time to first token), later steps are generated tokens (time per output token).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

logger = logging.getLogger(__name__)
disable_created_metrics()  # `*_created` series: not in the MindIE names, and meaningless once aggregated

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)
E2E_BUCKETS = (1, 2.5, 5, 10, 15, 20, 30, 40, 50, 60)
TOKEN_BUCKETS = (10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(
        self,
        model_name: str,
        on_gpu: bool,
        open_sessions: Callable[[], int],
        waiting: Callable[[], int],
        cache_usage: Callable[[], float],
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self._model = model_name

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.received = counter("request_received_total", "Number of requests received so far.")
        self.succeeded = counter("request_success_total", "Number of requests proceed successfully so far.")
        self.failed = counter("request_failed_total", "Number of requests failed so far.")
        counter("num_preemptions_total", "Cumulative number of preemption from the engine.")
        gauge("num_requests_running", "Number of requests currently running on NPU.").set_function(open_sessions)
        gauge("num_requests_waiting", "Number of requests waiting to be processed.").set_function(waiting)
        gauge("num_requests_swapped", "Number of requests swapped to CPU.")
        self.prompt_tokens = counter("prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Number of generation tokens processed.")
        # plain totals behind the derived gauges (prometheus_client keeps its own values private)
        self.totals = {
            "prompt_tokens": 0,
            "prompt_seconds": 0.0,
            "generation_tokens": 0,
            "generation_seconds": 0.0,
            "succeeded": 0,
            "failed": 0,
            "prefix_query_tokens": 0,
            "prefix_hit_tokens": 0,
        }
        gauge("avg_prompt_throughput_toks_per_s", "Average prefill throughput in tokens/s.").set_function(
            lambda: self._rate("prompt_tokens", "prompt_seconds")
        )
        gauge("avg_generation_throughput_toks_per_s", "Average generation throughput in tokens/s.").set_function(
            lambda: self._rate("generation_tokens", "generation_seconds")
        )
        gauge("failed_request_perc", "Requests failure rate. 1 means 100 percent usage.").set_function(
            self._failed_share
        )
        gauge("npu_cache_usage_perc", "NPU KV-cache usage. 1 means 100 percent usage.").set_function(
            cache_usage if on_gpu else (lambda: 0.0)
        )
        gauge("cpu_cache_usage_perc", "CPU KV-cache usage. 1 means 100 percent usage.").set_function(
            (lambda: 0.0) if on_gpu else cache_usage
        )
        self.prefix_queries = counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (vLLM's name)."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits_total", "Prompt tokens served from the prefix cache, not computed (vLLM's name)."
        )
        gauge("npu_prefix_cache_hit_rate", "NPU prefix cache block hit rate.").set_function(
            lambda: self._rate("prefix_hit_tokens", "prefix_query_tokens")
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds", "Histogram of time per output token in seconds.", TPOT_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", E2E_BUCKETS
        )
        self.request_prompt = histogram("request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self.request_generation = histogram(
            "request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS
        )
        self.pushed_steps = counter(
            "swarm_pushed_steps_total", "Steps received from the previous server of a chain (not a MindIE name)."
        )
        self.batch_steps = histogram(
            "swarm_batch_steps",
            "Sessions' steps computed together in one batched forward (not a MindIE name).",
            BATCH_BUCKETS,
        )
        self._recent_step_ms: list[float] = []

    def _rate(self, tokens: str, seconds: str) -> float:
        return self.totals[tokens] / self.totals[seconds] if self.totals[seconds] else 0.0

    def _failed_share(self) -> float:
        done = self.totals["succeeded"] + self.totals["failed"]
        return self.totals["failed"] / done if done else 0.0

    def session(self, prompt_only: bool = False) -> "SessionMetrics":
        self.received.inc()
        return SessionMetrics(self, prompt_only)

    def prefix_lookup(self, tokens: int, hits: int) -> None:
        """A session's prompt of `tokens` looked up in the prefix cache, `hits` of them found."""
        self.prefix_queries.inc(tokens)
        self.prefix_hits.inc(hits)
        self.totals["prefix_query_tokens"] += tokens
        self.totals["prefix_hit_tokens"] += hits

    def batch_round(self, steps: int) -> None:
        self.batch_steps.observe(steps)

    def median_step_ms(self) -> float | None:
        """Median compute time of recent steps, reported to the relay as this server's latency."""
        if not self._recent_step_ms:
            return None
        ordered = sorted(self._recent_step_ms)
        return ordered[len(ordered) // 2]

    def _step(self, seconds: float) -> None:
        self._recent_step_ms.append(seconds * 1000)
        del self._recent_step_ms[:-101]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def serve(self, host: str, port: int, status: Callable[[], str]) -> tuple[web.AppRunner, int]:
        """Serves `GET /metrics` and `GET /status` (`status()`: the server's own account, JSON) on
        host:port; returns the runner (to clean up) and the bound port."""

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def status_page(_request: web.Request) -> web.Response:
            return web.Response(text=status(), content_type="application/json")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status_page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner, runner.addresses[0][1]  # the port bound (0 asks for a free one)


class SessionMetrics:
    """Times one request: its first step is the prompt, each later step is generated tokens."""

    def __init__(self, metrics: ServerMetrics, prompt_only: bool):
        self.metrics = metrics
        self.prompt_only = prompt_only  # a stateless forward pass: every chunk is prompt
        self.opened = time.perf_counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0

    def step(self, tokens: int, seconds: float) -> None:
        m = self.metrics
        m._step(seconds)
        if self.steps == 0 or self.prompt_only:
            self.prompt_tokens += tokens
            m.prompt_tokens.inc(tokens)
            m.totals["prompt_tokens"] += tokens
            m.totals["prompt_seconds"] += seconds
            if self.steps == 0:
                m.ttft.observe(time.perf_counter() - self.opened)
        else:
            self.generation_tokens += tokens
            m.generation_tokens.inc(tokens)
            m.totals["generation_tokens"] += tokens
            m.totals["generation_seconds"] += seconds
            m.tpot.observe(seconds)
        self.steps += 1

    def finished(self, ok: bool) -> None:
        m = self.metrics
        if not ok:
            m.failed.inc()
            m.totals["failed"] += 1
            return
        m.succeeded.inc()
        m.totals["succeeded"] += 1
        m.e2e.observe(time.perf_counter() - self.opened)
        m.request_prompt.observe(self.prompt_tokens)
        m.request_generation.observe(self.generation_tokens)
