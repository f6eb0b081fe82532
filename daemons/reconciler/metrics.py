"""The reconciler's Prometheus metrics, on a registry of its own (several instances per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

CONDITIONS = ("Verified", "Routed", "JobRunning")
STATUSES = ("True", "False", "Unknown")


class ReconcilerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconcile_seconds = Histogram(
            "jobtunnel_reconciler_reconcile_seconds",
            "Duration of one reconcile of one Tunnel key",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.reconciles = Counter(
            "jobtunnel_reconciler_reconciles",
            "Reconciles run, by result (ok, error)",
            ["result"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "jobtunnel_reconciler_queue_depth",
            "Tunnel keys waiting in the work queue",
            registry=registry,
        )
        self.errors = Counter(
            "jobtunnel_reconciler_errors",
            "Errors by kind (api, conflict, watch, event, job, lease, discovery, networkpolicy)",
            ["kind"],
            registry=registry,
        )
        self.tunnels = Gauge(
            "jobtunnel_reconciler_tunnels",
            "Tunnels by condition type and status (as last written by this reconciler)",
            ["condition", "status"],
            registry=registry,
        )
        self.is_leader = Gauge(
            "jobtunnel_reconciler_leader",
            "1 while this replica holds the leader Lease",
            registry=registry,
        )
        self.restored = Counter(
            "jobtunnel_reconciler_restored",
            "Objects restored after their Tunnel went, by kind",
            ["kind"],
            registry=registry,
        )
        self.unrouted = Counter(
            "jobtunnel_reconciler_unrouted",
            "Verified Tunnels not routed, by reason (Routed=False transitions)",
            ["reason"],
            registry=registry,
        )
        self.readiness_writes = Counter(
            "jobtunnel_reconciler_readiness_writes",
            "Scheduler pod readiness patches (ready=true: set or re-asserted after a reset)",
            ["ready"],
            registry=registry,
        )
        for condition in CONDITIONS:
            for status in STATUSES:
                self.tunnels.labels(condition=condition, status=status).set(0)
        for kind in (
            "api",
            "conflict",
            "watch",
            "event",
            "job",
            "lease",
            "discovery",
            "networkpolicy",
        ):
            self.errors.labels(kind=kind)
