"""The agent's Prometheus metrics, read from its session's state at scrape time.

Gauges with ``set_function`` and one collector, rather than counters the session would
have to be handed: the session stays free of metrics, and what ``/metrics`` says is what
``/readyz`` and the tests see in `AgentState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from daemons.agent.session import AgentSession


class _IdentityConflicts(Collector):
    """A counter whose value lives in the session's state (`AgentState.identity_conflicts`)."""

    def __init__(self, session: AgentSession) -> None:
        self._session = session

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "jobtunnel_agent_identity_conflicts",
            "Times the forwarder said another session holds this agent's identity "
            "(replaced, or refused as identity-held): a duplicate job, or a stolen token",
            value=float(self._session.state.identity_conflicts),
        )

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def register(registry: CollectorRegistry, session: AgentSession) -> None:
    state = session.state
    gauges: list[tuple[str, str, Callable[[], float]]] = [
        (
            "jobtunnel_agent_connected",
            "1 while the session is published at the forwarder",
            lambda: 1.0 if state.published else 0.0,
        ),
        ("jobtunnel_agent_connects", "SSH connections made so far", lambda: float(state.connects)),
        (
            "jobtunnel_agent_heartbeat_rtt_seconds",
            "Last heartbeat round trip to the forwarder",
            lambda: state.last_rtt or 0.0,
        ),
        (
            "jobtunnel_agent_forwarded_connections",
            "Connections forwarded to the local services",
            lambda: float(state.connections_forwarded),
        ),
        (
            "jobtunnel_agent_identity_conflict",
            "1 while another session holds this agent's identity at the forwarder "
            "(the agent backs off and retries)",
            lambda: 1.0 if state.identity_conflict else 0.0,
        ),
    ]
    for name, documentation, value in gauges:
        Gauge(name, documentation, registry=registry).set_function(value)
    registry.register(_IdentityConflicts(session))
