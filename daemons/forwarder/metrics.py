"""The forwarder's Prometheus metrics, on a registry of its own.

Label values are bounded sets (refusal kinds, reason codes); per-session gauges
are removed when the session ends so that churn cannot grow the registry.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from daemons.forwarder.sessions import Session, SessionRegistry


class ForwarderMetrics:
    def __init__(self, registry: CollectorRegistry, *, port_capacity: int) -> None:
        self.refusals = Counter(
            "jobtunnel_forwarder_refusals",
            "Requests refused by policy, by kind (shell, exec, env, direct-tcpip, service...)",
            ["kind"],
            registry=registry,
        )
        self.protocol_errors = Counter(
            "jobtunnel_forwarder_protocol_errors",
            "Control channels closed for a protocol error, by error code",
            ["code"],
            registry=registry,
        )
        self.sessions_started = Counter(
            "jobtunnel_forwarder_sessions_started",
            "Authenticated SSH connections",
            registry=registry,
        )
        self.sessions_ended = Counter(
            "jobtunnel_forwarder_sessions_ended",
            "Sessions ended, by reason",
            ["reason"],
            registry=registry,
        )
        self.takeovers = Counter(
            "jobtunnel_forwarder_takeovers",
            "Published sessions replaced by a newer one of the same identity",
            registry=registry,
        )
        self.liveness_challenges = Counter(
            "jobtunnel_forwarder_liveness_challenges",
            "Claims of a published identity, by what the holder's liveness challenge found "
            "(alive: the claimant was refused; dead: the claimant replaces the holder)",
            ["outcome"],
            registry=registry,
        )
        self.sessions = Gauge(
            "jobtunnel_forwarder_sessions",
            "Live sessions by state",
            ["state"],
            registry=registry,
        )
        self.unauthenticated = Gauge(
            "jobtunnel_forwarder_unauthenticated_connections",
            "SSH connections not yet authenticated",
            registry=registry,
        )
        self.unauthenticated_closed = Counter(
            "jobtunnel_forwarder_unauthenticated_closed",
            "SSH connections that ended before authenticating (login timeout, failed logins)",
            registry=registry,
        )
        self.ports_in_use = Gauge(
            "jobtunnel_forwarder_ports_in_use",
            "Listener ports allocated from the range",
            registry=registry,
        )
        capacity = Gauge(
            "jobtunnel_forwarder_ports_capacity",
            "Size of the listener port range",
            registry=registry,
        )
        capacity.set(port_capacity)
        self.heartbeats = Counter(
            "jobtunnel_forwarder_heartbeats",
            "Heartbeats received from agents",
            registry=registry,
        )
        self.agent_connections = Gauge(
            "jobtunnel_agent_connections",
            "Connections an agent has forwarded to its services (relayed by heartbeat)",
            ["session", "user"],
            registry=registry,
        )
        self.agent_bytes = Gauge(
            "jobtunnel_agent_bytes",
            "Bytes an agent has forwarded (relayed by heartbeat)",
            ["session", "user", "direction"],
            registry=registry,
        )
        self.agent_service_up = Gauge(
            "jobtunnel_agent_service_up",
            "Whether the agent's local service answers (relayed by heartbeat)",
            ["session", "user", "service"],
            registry=registry,
        )

    def observe_counters(self, session: Session) -> None:
        c = session.counters
        self.heartbeats.inc()
        self.agent_connections.labels(session.id, session.user).set(c.connections)
        self.agent_bytes.labels(session.id, session.user, "in").set(c.bytes_in)
        self.agent_bytes.labels(session.id, session.user, "out").set(c.bytes_out)
        for service, up in session.services_up.items():
            self.agent_service_up.labels(session.id, session.user, service).set(1 if up else 0)

    def forget(self, session: Session) -> None:
        for gauge, extra in (
            (self.agent_connections, [()]),
            (self.agent_bytes, [("in",), ("out",)]),
            (self.agent_service_up, [(s,) for s in session.services_up]),
        ):
            for labels in extra:
                with contextlib.suppress(KeyError):
                    gauge.remove(session.id, session.user, *labels)

    def update_sessions(self, registry: SessionRegistry) -> None:
        published = len(registry.published())
        self.sessions.labels("published").set(published)
        self.sessions.labels("pending").set(max(0, len(registry) - published))
