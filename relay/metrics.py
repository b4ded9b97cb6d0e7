"""Aggregation of the servers' Prometheus metrics (seed `motor-coordinator-api`): pure functions from
each instance's exposition text to the relay's `/metrics?type=full|instance|role`.

- instance: every sample keeps its labels, with `instance_id` and `role` put first;
- full: samples with the same name and labels are combined across instances;
- role: as full, within each role, with a `role` label.

Counters, histograms and totals add up; ratios (`*_perc`, `*_rate`) and averages (`avg_*`) are
averaged, since a sum of percentages means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class InstanceMetrics:
    instance_id: str
    role: str
    text: str


def _averaged(family_name: str) -> bool:
    return family_name.endswith(("_perc", "_rate")) or family_name.startswith("avg_")


def _parse(instances: Iterable[InstanceMetrics]) -> list[tuple[InstanceMetrics, list[Metric]]]:
    parsed = []
    for instance in instances:
        try:
            families = list(text_string_to_metric_families(instance.text))
        except Exception:  # one server's garbage must not hide everyone else's metrics
            continue
        for family in families:  # creation timestamps mean nothing summed or averaged
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
        parsed.append((instance, families))
    return parsed


class _Static:
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self):
        return self.metrics


def _render(metrics: list[Metric]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Static(metrics))
    return generate_latest(registry).decode()


def per_instance(instances: Iterable[InstanceMetrics]) -> str:
    families: dict[str, Metric] = {}
    for instance, metrics in _parse(instances):
        for family in metrics:
            out = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            for sample in family.samples:
                labels = {
                    "instance_id": instance.instance_id,
                    "role": instance.role,
                    **{k: v for k, v in sample.labels.items() if k not in ("instance_id", "role")},
                }
                out.add_sample(sample.name, labels, sample.value)
    return _render(list(families.values()))


def _combine(parsed: list[tuple[InstanceMetrics, list[Metric]]], extra_labels: dict[str, str]) -> list[Metric]:
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list[float]]] = {}
    for _, metrics in parsed:
        for family in metrics:
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            bucket = values.setdefault(family.name, {})
            for sample in family.samples:
                labels = {
                    **extra_labels,
                    **{k: v for k, v in sample.labels.items() if k not in ("instance_id", "role")},
                }
                bucket.setdefault((sample.name, tuple(labels.items())), []).append(sample.value)
    for name, family in families.items():
        for (sample_name, labels), found in values[name].items():
            value = sum(found) / len(found) if _averaged(name) else sum(found)
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def aggregated(instances: Iterable[InstanceMetrics], own: str = "") -> str:
    """`type=full`: one value per metric over all instances, after the relay's own process metrics."""
    return own + _render(_combine(_parse(instances), {}))


def by_role(instances: Iterable[InstanceMetrics], role: Optional[str] = None) -> str:
    """`type=role`: one aggregate per role (only `role` when given), each with a `role` label."""
    parsed = _parse(instances)
    roles = [role] if role else sorted({instance.role for instance, _ in parsed})
    parts = []
    for name in roles:
        members = [(instance, metrics) for instance, metrics in parsed if instance.role == name]
        if members:
            parts.append(_render(_combine(members, {"role": name})))
    return "".join(parts)
