"""Live sessions: who is connected, what they expose, and which one is published.

The registry is the forwarder's single source of truth for ``/tunnels`` and for
publishers. Takeover is one synchronous step (no ``await`` between removing the
old session and adding the new one), so no observer ever sees both or neither.

Who may take over: identity comes from the token alone, so whoever holds a user's
token can claim any of that user's identities. A claim therefore never replaces a
live holder: the holder is asked to prove it is alive (`LivenessChallenge`, a
``ping`` it must answer within a bound), and only a holder that stays silent (a
dead job, a half-open TCP connection, a partition) is replaced. The limit that
remains: a thief can still take an identity whose holder is really gone, or
partitioned for longer than the bound; the replaced agent then keeps retrying and
says so in its log and metrics, so the theft is visible, not silent.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from shared.protocol import AgentCounters, JobInfo, PodInfo


@dataclass(slots=True)
class Forward:
    """One service exposed for a session: where the cluster reaches it."""

    service: str
    host: str
    port: int
    requested_port: int = 0


@dataclass(slots=True)
class RefusedPeer:
    """An in-cluster peer refused by the source allow-list, as the owner will see it."""

    address: str
    count: int
    first: float
    last: float

    def describe(self) -> dict[str, object]:
        return {
            "address": self.address,
            "count": self.count,
            "firstRefused": _iso(self.first),
            "lastRefused": _iso(self.last),
        }


@dataclass(slots=True, eq=False)
class LivenessChallenge:
    """One "are you alive?" put to a published session, shared by every claimant of it.

    Nothing runs it: it is a nonce, a deadline and an event. The holder's connection
    settles it when the answer arrives (or as dead when it ends); each claimant waits on
    it up to the same deadline, so concurrent claimants cost the holder one ``ping`` and
    none waits longer than the bound.
    """

    nonce: str
    deadline: float  # on anyio's clock
    settled: anyio.Event = field(default_factory=anyio.Event)
    alive: bool = False

    def settle(self, alive: bool) -> None:
        """The first word counts: a late answer cannot revive a holder found dead."""
        if not self.settled.is_set():
            self.alive = alive
            self.settled.set()

    async def wait(self) -> bool:
        """Whether the holder answered in time; False once the deadline has passed."""
        with anyio.move_on_after(max(0.0, self.deadline - anyio.current_time())):
            await self.settled.wait()
        if not self.settled.is_set():
            self.settle(False)
        return self.alive


@dataclass(slots=True, eq=False)
class Session:
    id: str
    user: str
    peer: str
    mode: str  # "agent" (control channel) or "ssh" (plain client, forwards only)
    since: float = field(default_factory=time.time)
    identity: tuple[str, str] | None = None
    instance_id: str | None = None
    agent_version: str | None = None
    job: JobInfo | None = None
    pod: PodInfo | None = None
    private_ip: str | None = None
    forwards: dict[str, Forward] = field(default_factory=dict)
    # The services' own ports inside the job, as announced (workers dial these).
    service_ports: dict[str, int] = field(default_factory=dict)
    services_up: dict[str, bool] = field(default_factory=dict)
    last_heartbeat: float | None = None
    counters: AgentCounters = field(default_factory=AgentCounters)
    published: bool = False
    # Peers refused by the source allow-list, and claimants refused this session's identity
    # while it was alive: bounded by the caller, the rest only counted.
    refused: dict[str, RefusedPeer] = field(default_factory=dict)
    refused_claims: dict[str, RefusedPeer] = field(default_factory=dict)
    refused_total: int = 0
    # Set by the server: ``close(reason, code)`` ends the session with an error
    # frame the agent can act on (e.g. code "replaced": someone else has its identity).
    close: Callable[[str, str], None] = field(default=lambda _r, _c: None, repr=False)
    # Set by the server: ``probe(challenge)`` asks the agent to prove it is alive and
    # settles the challenge when it does. The default asks nobody: the challenge expires.
    probe: Callable[[LivenessChallenge], None] = field(default=lambda _c: None, repr=False)
    challenge: LivenessChallenge | None = field(default=None, repr=False)

    def challenge_liveness(self, timeout: float) -> LivenessChallenge:
        """The challenge in flight, or a new one: claimants share one until its deadline.

        An answered challenge is reused until its deadline too, so a burst of claims costs
        the holder one ``pong`` per ``timeout`` and can't push it over its frame rate.
        """
        current = self.challenge
        if current is not None and anyio.current_time() < current.deadline:
            return current
        current = LivenessChallenge(
            nonce=secrets.token_urlsafe(12), deadline=anyio.current_time() + timeout
        )
        self.challenge = current
        self.probe(current)
        return current

    def describe(self, advertise_host: str | None = None) -> dict[str, object]:
        """The ``/tunnels`` entry: everything an operator needs, nothing secret."""
        return {
            "id": self.id,
            "user": self.user,
            "peer": self.peer,
            "mode": self.mode,
            "identity": ":".join(self.identity) if self.identity else None,
            "job": _job_dict(self.job),
            "pod": _pod_dict(self.pod),
            "private_ip": self.private_ip,
            "since": _iso(self.since),
            "last_heartbeat": _iso(self.last_heartbeat),
            "agent_version": self.agent_version,
            "services": {
                name: _address(advertise_host or fwd.host, fwd.port)
                for name, fwd in sorted(self.forwards.items())
            },
            "services_up": dict(self.services_up),
            "refused_sources": self.refused_sources(),
            "refused_claims": self.refused_claimants(),
        }

    def refuse_source(self, address: str, limit: int, now: float | None = None) -> bool:
        """Record a refused peer; True when it is one not seen before (worth reporting)."""
        self.refused_total += 1
        return _record(self.refused, address, limit, now)

    def refuse_claim(self, address: str, limit: int, now: float | None = None) -> bool:
        """Record a claimant refused this identity; True when its address is new."""
        return _record(self.refused_claims, address, limit, now)

    def refused_sources(self) -> list[dict[str, object]]:
        return [peer.describe() for _, peer in sorted(self.refused.items())]

    def refused_claimants(self) -> list[dict[str, object]]:
        return [peer.describe() for _, peer in sorted(self.refused_claims.items())]


def _record(table: dict[str, RefusedPeer], address: str, limit: int, now: float | None) -> bool:
    now = time.time() if now is None else now
    known = table.get(address)
    if known is not None:
        known.count += 1
        known.last = now
        return False
    if len(table) >= limit:
        return False
    table[address] = RefusedPeer(address, 1, now, now)
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _job_dict(job: JobInfo | None) -> dict[str, object] | None:
    if job is None:
        return None
    return {
        "global_job_id": job.global_job_id,
        "cluster_id": job.cluster_id,
        "proc_id": job.proc_id,
        "schedd": job.schedd,
    }


def _pod_dict(pod: PodInfo | None) -> dict[str, str] | None:
    if pod is None:
        return None
    return {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}


def identity_of(
    user: str, pod: PodInfo | None, job: JobInfo | None, instance_id: str
) -> tuple[str, str]:
    """The most specific thing a session is: two schedulers of one user never collide."""
    if pod is not None:
        return (user, f"pod:{pod.uid}")
    if job is not None:
        return (user, f"job:{job.global_job_id}")
    return (user, f"instance:{instance_id}")


EndSession = Callable[[str, str, str], None]
"""``end_session(session_id, reason, code)``: how a publisher ends a session it learns is gone.

The code reaches the agent in an ``error`` frame: on ``replaced`` it backs off, retries and
reports that someone else holds its identity."""


class Publisher(Protocol):
    """Where published sessions go besides ``/tunnels`` (e.g. Kubernetes Tunnel objects).

    ``publish``/``unpublish``/``heartbeat`` are called from session tasks and must
    not block on a remote API for long: a publisher records the desired state and
    converges in ``run``, its own task in the forwarder's task group, which also
    ends sessions whose publication was withdrawn by someone else.
    """

    async def run(
        self, end_session: EndSession, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
    ) -> None: ...

    async def publish(self, session: Session) -> None: ...

    async def unpublish(self, session: Session, reason: str) -> None: ...

    def heartbeat(self, session: Session) -> None: ...

    def ready_check(self) -> str | None: ...

    async def held_elsewhere(self, session: Session) -> str | None:
        """Who else (another forwarder replica) publishes ``session``'s identity and is alive,
        or None; a publisher that cannot tell says None (an outage must not lock agents out)."""
        ...

    def admits_source(self, session: Session, host: str) -> bool | None:
        """Whether the cluster allows ``host`` to reach ``session``'s services (beyond the
        forwarder's own ``allowed_sources``); None while the publisher does not know yet."""
        ...

    def refusals_changed(self, session: Session) -> None:
        """``session`` refused a peer (or a claimant) not seen before: tell its owner."""
        ...


class MemoryPublisher:
    """Standalone mode: the registry itself is the publication (``/tunnels``)."""

    async def run(
        self, end_session: EndSession, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()

    async def publish(self, session: Session) -> None:
        return None

    async def unpublish(self, session: Session, reason: str) -> None:
        return None

    def heartbeat(self, session: Session) -> None:
        return None

    def ready_check(self) -> str | None:
        return None

    async def held_elsewhere(self, session: Session) -> str | None:
        return None  # one forwarder: the registry knows every holder

    def admits_source(self, session: Session, host: str) -> bool | None:
        return False  # standalone: the forwarder's allowed_sources are the whole list

    def refusals_changed(self, session: Session) -> None:
        return None  # /tunnels shows the session's refused_sources and refused_claims


class SessionLimit(Exception):
    """A user already has as many sessions as allowed."""


class SessionRegistry:
    def __init__(self, *, max_per_user: int) -> None:
        self._max_per_user = max_per_user
        self._live: dict[str, Session] = {}
        self._published: dict[tuple[str, str], Session] = {}

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._live.values()))

    def __len__(self) -> int:
        return len(self._live)

    def published(self) -> list[Session]:
        return sorted(self._published.values(), key=lambda s: s.since)

    def add(self, session: Session) -> None:
        self._live[session.id] = session

    def check_limit(self, session: Session) -> None:
        """Refuse a session beyond the per-user limit, pending ones included.

        A takeover (the identity is published: a reconnect after a half-dead connection)
        may go one over the limit, and only while the user has no other pending session:
        otherwise pending ``hello``s claiming one published identity would be unbounded.
        """
        others = [s for s in self._live.values() if s.user == session.user and s is not session]
        if len(others) < self._max_per_user:
            return
        takeover = session.identity is not None and session.identity in self._published
        pending = [s for s in others if not s.published]
        if takeover and len(others) == self._max_per_user and not pending:
            return
        raise SessionLimit(
            f"user {session.user!r} already has {len(others)} sessions "
            f"(limit {self._max_per_user}, pending ones included)"
        )

    def holder(self, session: Session) -> Session | None:
        """The published session of ``session``'s identity (maybe ``session`` itself)."""
        return self._published.get(session.identity or (session.user, f"session:{session.id}"))

    def publish(self, session: Session) -> Session | None:
        """Publish ``session``; returns the session it replaced, already unpublished."""
        key = session.identity or (session.user, f"session:{session.id}")
        old = self._published.get(key)
        if old is session:
            return None
        if old is not None:
            old.published = False
        self._published[key] = session
        session.published = True
        return old

    def remove(self, session: Session) -> bool:
        """Forget ``session``; True if it was the published one for its identity."""
        self._live.pop(session.id, None)
        key = session.identity or (session.user, f"session:{session.id}")
        if self._published.get(key) is session:
            del self._published[key]
            session.published = False
            return True
        return False
