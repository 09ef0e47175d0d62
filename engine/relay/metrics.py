"""Relay server metrics in the Prometheus text exposition format (0.0.4).

Plain counters in one object, updated from the event loop only (no locks
needed: the hot path adds to ints) and written out by prometheus_client on
``GET /metrics``. Labels carry dataset-independent
values only (result kinds, error codes): never a token, and never dataset or
node names, so that the number of series stays bounded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

#: Upper bounds (seconds) of the commit latency histogram buckets: from a
#: fast fsync (~1 ms) to a commit stuck behind a compaction of a big document.
COMMIT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@dataclass
class Histogram:
    """A cumulative Prometheus histogram with fixed buckets."""

    buckets: tuple[float, ...] = COMMIT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def family(self, name: str) -> HistogramMetricFamily:
        """The histogram as a prometheus_client family (cumulative buckets)."""
        running = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            buckets.append((f"{bound:g}", running))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(
            name,
            "Time of one group commit in the store thread.",
            buckets=buckets,
            sum_value=self.total,
        )


@dataclass
class RelayMetrics:
    """Counters of one relay server. Gauges that the server knows at render
    time (connections open, datasets connected, documents in memory, queue
    depth) are passed to ``render``."""

    connections_total: int = 0
    connections_rejected: Counter[str] = field(default_factory=Counter)  # by error code
    protocol_errors: Counter[str] = field(default_factory=Counter)  # sent, by code
    updates_in: Counter[str] = field(default_factory=Counter)  # stored/duplicate/rejected
    updates_refused: Counter[str] = field(default_factory=Counter)  # refused frames, by code
    updates_fanned_out: int = 0
    updates_followed: int = 0  # committed by other relays on the store, read back
    follow_resyncs: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    frames_out: int = 0
    batches_committed: int = 0
    commit_failures: int = 0
    slow_consumers_dropped: int = 0
    sync_requests: int = 0
    leases_granted: int = 0
    leases_denied: int = 0
    commit_seconds: Histogram = field(default_factory=Histogram)

    def render(
        self,
        *,
        connections_open: int,
        datasets_connected: int,
        documents_in_memory: int | None,
        commit_queue: int,
    ) -> str:
        """The exposition text (ends with a newline), written by prometheus_client
        from a registry made for this render (never the process-global one, so
        several relays in one process keep their figures apart)."""
        fams: list[Metric] = []
        p = "branchline_relay_"

        def gauge(name: str, help_text: str, value: float) -> None:
            fams.append(GaugeMetricFamily(p + name, help_text, value=value))

        def counter(name: str, help_text: str, value: float) -> None:
            fams.append(CounterMetricFamily(p + name, help_text, value=value))

        def labelled(name: str, help_text: str, label: str, values: dict[str, int]) -> None:
            fam = CounterMetricFamily(p + name, help_text, labels=[label])
            for key in sorted(values):
                fam.add_metric([key], values[key])
            fams.append(fam)

        gauge("connections_open", "Websocket connections open now.", connections_open)
        counter("connections_total", "Websocket connections accepted.", self.connections_total)
        labelled(
            "connections_rejected_total",
            "Handshakes refused, by error code.",
            "code",
            dict(self.connections_rejected),
        )
        labelled(
            "protocol_errors_total",
            "Error frames sent to clients, by code.",
            "code",
            dict(self.protocol_errors),
        )
        labelled(
            "updates_in_total",
            "Client updates committed, by result.",
            "result",
            {k: self.updates_in.get(k, 0) for k in ("stored", "duplicate", "rejected")},
        )
        labelled(
            "updates_refused_total",
            "Client updates refused without ending the session (e.g. locked period), by code.",
            "code",
            dict(self.updates_refused),
        )
        counter(
            "updates_fanned_out_total",
            "Stored updates sent to other connections of their dataset.",
            self.updates_fanned_out,
        )
        counter(
            "updates_followed_total",
            "Updates committed by other relays on the same store, read back to fan out.",
            self.updates_followed,
        )
        counter(
            "follow_resyncs_total",
            "Datasets whose connections were closed to resync (the follower lost its place).",
            self.follow_resyncs,
        )
        counter("bytes_in_total", "Websocket message bytes received.", self.bytes_in)
        counter("bytes_out_total", "Websocket message bytes sent.", self.bytes_out)
        counter("frames_in_total", "Websocket messages received.", self.frames_in)
        counter("frames_out_total", "Websocket messages sent.", self.frames_out)
        counter(
            "batches_committed_total", "Group commits of client updates.", self.batches_committed
        )
        counter(
            "commit_failures_total",
            "Group commits that failed (nothing of them stored or acknowledged).",
            self.commit_failures,
        )
        fams.append(self.commit_seconds.family(p + "commit_seconds"))
        gauge(
            "commit_queue_updates",
            "Updates received and waiting for the next group commit.",
            commit_queue,
        )
        counter(
            "slow_consumers_dropped_total",
            "Connections dropped because their send queue was full.",
            self.slow_consumers_dropped,
        )
        counter("sync_requests_total", "sync1 requests answered.", self.sync_requests)
        counter("leases_granted_total", "blocks leases granted.", self.leases_granted)
        counter("leases_denied_total", "blocks leases denied.", self.leases_denied)
        gauge(
            "datasets_connected",
            "Datasets with at least one open connection.",
            datasets_connected,
        )
        if documents_in_memory is not None:
            gauge(
                "documents_in_memory",
                "Documents the store holds in memory (all datasets).",
                documents_in_memory,
            )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(fams))
        return generate_latest(registry).decode()


class _Families(Collector):
    """The metric families of one render, for a registry of their own."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)
