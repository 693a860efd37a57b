"""The Prometheus endpoint serves the gateway's counters."""

from __future__ import annotations

import urllib.request

from gateway.metrics import Metrics
from simulator.server import free_port


def test_the_endpoint_serves_requests_by_category_and_decision() -> None:
    metrics = Metrics()
    port = free_port()
    metrics.serve(port)
    metrics.count_request("consumption", "refuse")
    metrics.count_request("consumption", "refuse")
    metrics.count_request("firmware", "forward")
    metrics.alerts.labels(category="billing", delivery="withhold").inc()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'mp169_requests_total{category="consumption",decision="refuse"} 2.0' in text
    assert 'mp169_requests_total{category="firmware",decision="forward"} 1.0' in text
    assert 'mp169_alerts_total{category="billing",delivery="withhold"} 1.0' in text
    assert "mp169_request_handling_seconds_bucket" in text


def test_the_longest_commit_is_kept_beside_the_commit_histogram() -> None:
    metrics = Metrics()
    for seconds in (0.02, 0.7, 0.3):
        metrics.observe_commit(seconds, 4)
    assert metrics.registry.get_sample_value("mp169_store_commit_seconds_max") == 0.7
    assert metrics.registry.get_sample_value("mp169_store_commit_seconds_count") == 3
    assert metrics.registry.get_sample_value("mp169_store_commit_batch_size_sum") == 12
