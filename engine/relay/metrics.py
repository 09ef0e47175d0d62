"""Relay server metrics in the Prometheus text exposition format (0.0.4).

Plain counters in one object, updated from the event loop only (no locks
needed) and rendered on ``GET /metrics``. Labels carry dataset-independent
values only (result kinds, error codes): never a token, and never dataset or
node names, so that the number of series stays bounded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


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
        """The exposition text (ends with a newline)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float | int) -> None:
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"))

        def labelled(
            name: str, kind: str, help_text: str, label: str, values: dict[str, int]
        ) -> None:
            out.extend((f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"))
            for key in sorted(values):
                out.append(f'{name}{{{label}="{key}"}} {values[key]}')

        p = "branchline_relay_"
        metric(p + "connections_open", "gauge", "Websocket connections open now.", connections_open)
        metric(
            p + "connections_total",
            "counter",
            "Websocket connections accepted.",
            self.connections_total,
        )
        labelled(
            p + "connections_rejected_total",
            "counter",
            "Handshakes refused, by error code.",
            "code",
            dict(self.connections_rejected),
        )
        labelled(
            p + "protocol_errors_total",
            "counter",
            "Error frames sent to clients, by code.",
            "code",
            dict(self.protocol_errors),
        )
        labelled(
            p + "updates_in_total",
            "counter",
            "Client updates committed, by result.",
            "result",
            {k: self.updates_in.get(k, 0) for k in ("stored", "duplicate", "rejected")},
        )
        labelled(
            p + "updates_refused_total",
            "counter",
            "Client updates refused without ending the session (e.g. locked period), by code.",
            "code",
            dict(self.updates_refused),
        )
        metric(
            p + "updates_fanned_out_total",
            "counter",
            "Stored updates sent to other connections of their dataset.",
            self.updates_fanned_out,
        )
        metric(p + "bytes_in_total", "counter", "Websocket message bytes received.", self.bytes_in)
        metric(p + "bytes_out_total", "counter", "Websocket message bytes sent.", self.bytes_out)
        metric(p + "frames_in_total", "counter", "Websocket messages received.", self.frames_in)
        metric(p + "frames_out_total", "counter", "Websocket messages sent.", self.frames_out)
        metric(
            p + "batches_committed_total",
            "counter",
            "Group commits of client updates.",
            self.batches_committed,
        )
        metric(
            p + "commit_failures_total",
            "counter",
            "Group commits that failed (nothing of them stored or acknowledged).",
            self.commit_failures,
        )
        out.extend(
            self.commit_seconds.render(
                p + "commit_seconds", "Time of one group commit in the store thread."
            )
        )
        metric(
            p + "commit_queue_updates",
            "gauge",
            "Updates received and waiting for the next group commit.",
            commit_queue,
        )
        metric(
            p + "slow_consumers_dropped_total",
            "counter",
            "Connections dropped because their send queue was full.",
            self.slow_consumers_dropped,
        )
        metric(p + "sync_requests_total", "counter", "sync1 requests answered.", self.sync_requests)
        metric(p + "leases_granted_total", "counter", "blocks leases granted.", self.leases_granted)
        metric(p + "leases_denied_total", "counter", "blocks leases denied.", self.leases_denied)
        metric(
            p + "datasets_connected",
            "gauge",
            "Datasets with at least one open connection.",
            datasets_connected,
        )
        if documents_in_memory is not None:
            metric(
                p + "documents_in_memory",
                "gauge",
                "Documents the store holds in memory (all datasets).",
                documents_in_memory,
            )
        return "\n".join(out) + "\n"
