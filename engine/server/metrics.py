"""Prometheus metrics of the branch server (``GET /metrics``), on a
registry of its own per app (never the process-global one), so several
servers in one process (tests) do not share series.

Gauges come from the status the server keeps (``StatusHub``) at scrape
time; histograms time API requests (by route template and method: a
bounded set of labels, never a record id or a token), sync passes and the
handling of received updates on the sync thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: From a cached status read (~0.2 ms) to a 100k-record page.
API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: From a live update to a first sync of a big dataset.
SYNC_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StatusCollector(Collector):
    """Gauges read from the latest status (``status()`` returns it or None)."""

    def __init__(self, status: Callable[[], dict[str, Any] | None], wall_ms: Callable[[], int]):
        self._status = status
        self._wall_ms = wall_ms

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self._status()
        if st is None:
            return
        p = "branchline_node_"
        pending = GaugeMetricFamily(
            p + "pending_records",
            "Records with local changes waiting to go up, by collection.",
            labels=["collection"],
        )
        for coll, n in sorted(st["pending"].items()):
            pending.add_metric([coll], n)
        yield pending
        failures = GaugeMetricFamily(
            p + "sync_failures", "Sync failures waiting for a person.", labels=["direction"]
        )
        for direction, n in sorted(st["failures"].items()):
            failures.add_metric([direction], n)
        yield failures
        yield GaugeMetricFamily(p + "conflicts", "Open conflicts.", value=st["conflicts"])
        yield GaugeMetricFamily(
            p + "waiting_records",
            "Received records waiting for a record they refer to.",
            value=st["waiting"],
        )
        yield GaugeMetricFamily(
            p + "online", "1 when the sync loop is connected to the relay.", value=int(st["online"])
        )
        if st["last_sync"] is not None:
            age = max(0.0, (self._wall_ms() - st["last_sync"]) / 1000)
            yield GaugeMetricFamily(
                p + "last_sync_age_seconds", "Seconds since the last complete sync pass.", value=age
            )


class NodeMetrics:
    """The branch server's metrics on their own registry."""

    def __init__(
        self, status: Callable[[], dict[str, Any] | None], wall_ms: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        p = "branchline_node_"
        self.api_seconds = Histogram(
            p + "api_request_seconds",
            "Time to answer one API request, by route and method.",
            ["route", "method"],
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        self.sync_seconds = Histogram(
            p + "sync_pass_seconds",
            "Time from connecting to the relay to a complete sync pass.",
            buckets=SYNC_BUCKETS,
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            p + "sync_apply_seconds",
            "Time to handle one received sync message (import included) on the sync thread.",
            buckets=APPLY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status, wall_ms))

    def observe_api(self, route: str, method: str, started: float) -> None:
        self.api_seconds.labels(route, method).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
