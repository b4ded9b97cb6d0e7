"""The relay's metrics: each server's series, aggregated by model and role."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import InstanceMetrics, aggregated, by_role, per_instance
from swarm.metrics import ServerMetrics
from tests.helpers.metrics import values

MINDIE_NAMES = {
    "request_received",
    "request_success",
    "request_failed",
    "num_preemptions",
    "num_requests_running",
    "num_requests_waiting",
    "num_requests_swapped",
    "prompt_tokens",
    "generation_tokens",
    "avg_prompt_throughput_toks_per_s",
    "avg_generation_throughput_toks_per_s",
    "failed_request_perc",
    "npu_cache_usage_perc",
    "cpu_cache_usage_perc",
    "npu_prefix_cache_hit_rate",
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "e2e_request_latency_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
}


def server_text(sessions: list[tuple[int, int, bool]], cache_usage: float) -> str:
    """Exposition text of a server that ran `sessions` = (prompt tokens, generated tokens, succeeded)."""
    metrics = ServerMetrics(
        "m", on_gpu=False, open_sessions=lambda: 1, waiting=lambda: 0, cache_usage=lambda: cache_usage
    )
    for prompt, generated, ok in sessions:
        session = metrics.session()
        session.step(prompt, 0.05)
        for _ in range(generated):
            session.step(1, 0.02)
        session.finished(ok)
    return metrics.render().decode()


def test_a_server_exports_the_mindie_metric_names():
    text = server_text([(10, 4, True), (3, 0, False)], 0.25)
    families = {f.name for f in text_string_to_metric_families(text)}
    # The MindIE names, vLLM's prefix-cache counters, how well steps batch and how many arrive pushed.
    prefix = {"prefix_cache_queries", "prefix_cache_hits"}
    assert families == MINDIE_NAMES | prefix | {"swarm_batch_steps", "swarm_pushed_steps"}
    assert values(text, "request_received_total") == {(("model_name", "m"),): 2.0}
    assert values(text, "request_success_total") == {(("model_name", "m"),): 1.0}
    assert values(text, "prompt_tokens_total") == {(("model_name", "m"),): 13.0}
    assert values(text, "generation_tokens_total") == {(("model_name", "m"),): 4.0}
    assert values(text, "failed_request_perc") == {(("model_name", "m"),): 0.5}
    assert values(text, "cpu_cache_usage_perc") == {(("model_name", "m"),): 0.25}
    assert values(text, "npu_cache_usage_perc") == {(("model_name", "m"),): 0.0}
    assert values(text, "time_per_output_token_seconds_count") == {(("model_name", "m"),): 4.0}
    assert values(text, "request_generation_tokens_sum") == {(("model_name", "m"),): 4.0}
    assert not any(
        name.endswith("_created") for f in text_string_to_metric_families(text) for name in [s.name for s in f.samples]
    )


def test_the_prefix_cache_counts_tokens_looked_up_and_found():
    metrics = ServerMetrics("m", on_gpu=False, open_sessions=lambda: 0, waiting=lambda: 0, cache_usage=lambda: 0.0)
    assert values(metrics.render().decode(), "npu_prefix_cache_hit_rate") == {(("model_name", "m"),): 0.0}
    metrics.prefix_lookup(100, 64)
    metrics.prefix_lookup(60, 0)
    text = metrics.render().decode()
    assert values(text, "prefix_cache_queries_total") == {(("model_name", "m"),): 160.0}
    assert values(text, "prefix_cache_hits_total") == {(("model_name", "m"),): 64.0}
    assert values(text, "npu_prefix_cache_hit_rate") == {(("model_name", "m"),): 0.4}


def test_instance_full_and_role_views():
    a = InstanceMetrics("1", "prefill", server_text([(10, 2, True)], 0.2))
    b = InstanceMetrics("2", "decode", server_text([(5, 3, True), (5, 3, True)], 0.6))
    c = InstanceMetrics("3", "decode", server_text([(1, 1, False)], 0.4))
    broken = InstanceMetrics("4", "decode", "this is { not prometheus")

    instance = per_instance([a, b, c, broken])
    received = values(instance, "request_received_total")
    assert received == {
        (("instance_id", "1"), ("model_name", "m"), ("role", "prefill")): 1.0,
        (("instance_id", "2"), ("model_name", "m"), ("role", "decode")): 2.0,
        (("instance_id", "3"), ("model_name", "m"), ("role", "decode")): 1.0,
    }
    assert "# TYPE request_received_total counter" in instance

    full = aggregated([a, b, c], own="# own\n")
    assert full.startswith("# own\n")
    assert values(full, "request_received_total") == {(("model_name", "m"),): 4.0}
    assert values(full, "generation_tokens_total") == {(("model_name", "m"),): 9.0}
    assert values(full, "time_to_first_token_seconds_count") == {(("model_name", "m"),): 4.0}
    cache = values(full, "cpu_cache_usage_perc")[(("model_name", "m"),)]
    assert abs(cache - 0.4) < 1e-9  # a ratio is averaged, not summed
    assert "# TYPE time_to_first_token_seconds histogram" in full

    decode = by_role([a, b, c], "decode")
    assert values(decode, "request_received_total") == {(("model_name", "m"), ("role", "decode")): 3.0}
    assert abs(values(decode, "cpu_cache_usage_perc")[(("model_name", "m"), ("role", "decode"))] - 0.5) < 1e-9
    assert by_role([a, b, c]) == by_role([a, b, c], "decode") + by_role(
        [a, b, c], "prefill"
    )  # every role, one text each
