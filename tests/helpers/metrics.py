"""Reading Prometheus text the way a scraper does."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def values(text: str, name: str) -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


def scrape(metrics_url: str, name: str) -> dict[tuple, float]:
    """Samples `name` of a server's /metrics, by their labels."""
    return values(urllib.request.urlopen(metrics_url, timeout=30).read().decode(), name)
