"""Prometheus metrics of one hub process, and what ``/metrics`` serves.

With ``hub serve --workers N`` each worker writes its values to files in a
directory shared by all of them (``PROMETHEUS_MULTIPROC_DIR``, set by the
parent), and ``/metrics`` on any worker reports the sum over all: counters
and histograms add up; gauges of live state (connections) add up over the
living workers; event-loop lag is the worst worker's.

Hot paths only touch counters and histograms; gauges of state are sampled
once a second by :meth:`Metrics.sample`.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "multiprocess_dir"]

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the hub exports; one instance per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "hub_connections", "Open WebSocket connections", registry=r, multiprocess_mode="livesum"
        )
        self.users_online = Gauge(
            "hub_users_online",
            "Users with at least one WebSocket connection (per process, summed)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pushes = Counter(
            "hub_pushes",
            "Pushes answered, by result: applied, unchanged, replay, or the error code"
            " (refused before its commit, or by it)",
            ["result"],
            registry=r,
        )
        self.changes = Counter(
            "hub_changes", "Changes of committed pushes: applied or ignored", ["result"], registry=r
        )
        self.push_seconds = Histogram(
            "hub_push_seconds",
            "From a push entering the committer to its result",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.commit_seconds = Histogram(
            "hub_commit_seconds",
            "Time of one batch's database transaction (push_seconds less this: queueing)",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_pushes = Histogram(
            "hub_commit_batch_pushes",
            "Pushes per database transaction",
            registry=r,
            buckets=BATCH_BUCKETS,
        )
        self.events_published = Counter(
            "hub_events_published", "Change events of committed pushes", registry=r
        )
        self.deliveries = Counter(
            "hub_event_deliveries",
            "Events handed to connections, by message type",
            ["type"],
            registry=r,
        )
        # The children counted on every event, looked up once.
        self.change_deliveries = self.deliveries.labels("change")
        self.notice_deliveries = self.deliveries.labels("sync_available")
        self.delivery_seconds = Histogram(
            "hub_delivery_seconds",
            "From a push's commit to its event being handed to a connection of this process",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.slow_closes = Counter(
            "hub_slow_consumer_closes", "Connections closed with 1013 (too slow)", registry=r
        )
        self.pulls = Counter("hub_pulls", "Pulls answered, by result", ["result"], registry=r)
        self.auth_failures = Counter(
            "hub_auth_failures", "Refused credentials, by reason", ["reason"], registry=r
        )
        self.broker_reconnects = Counter(
            "hub_broker_reconnects",
            "Broker connections lost, and attempts to connect that failed",
            registry=r,
        )
        self.broker_dropped = Counter(
            "hub_broker_dropped_events", "Events not published: broker down", registry=r
        )
        self.db_pool_in_use = Gauge(
            "hub_db_pool_in_use",
            "Database connections in use",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.loop_lag = Gauge(
            "hub_event_loop_lag_seconds",
            "How late the event loop ran a timer, last second (worst process)",
            registry=r,
            multiprocess_mode="livemax",
        )

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of all workers in multi-process mode."""
        if multiprocess_dir() is not None:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
