"""Admission: who may use the forwarder, and how much, before and after authentication.

What is trusted, and why:

- Before authentication nothing a peer says is trusted: not its user name (a token pasted
  into the user field is as likely as a real name, so unknown names are never logged
  verbatim), not its pace. The only fact is the TCP source address the kernel reports, and
  even that names a *group* of people (a NAT, a pod network, an IPv6 host holding a whole
  /64): :func:`source_group` folds IPv6 to its /64 so one host cannot pose as millions.
- Pre-auth slots are a shared pool. OpenSSH's MaxStartups refuses newcomers when it is full,
  which lets a flood of idle connections lock every real user out. :class:`PreAuthAdmission`
  instead always admits the newcomer and evicts the oldest of the least advanced connections
  (said nothing < sent its SSH version < asked to authenticate: a real client is past the
  first within a round trip and asks to authenticate within one key exchange, an idle flood
  never does; a version still unread in the kernel buffer counts as sent, or a burst accepted
  in the same loop turn behind a real client would evict it), first within the newcomer's own
  source group (``max_per_source``), then in the whole pool (``max_total``). A flood can then
  only churn itself; the limit that remains is a flood of full key exchanges from many
  addresses, which costs the attacker as much CPU as us and is bounded by ``login_timeout``.
- After authentication the user is known but still not trusted with resources:
  :class:`ConnectionBudget` bounds what one connection may ask for (channels, forward
  requests, authentication attempts, refused requests: past that it is disconnected), and
  :class:`RateLimit` bounds its control frames per second.

Every refusal here is counted in ``jobtunnel_forwarder_refusals_total{kind}`` by the server
and logged through :class:`shared.summary.LogSummary` (one line per source and kind per
interval), so no attack above can flood the log either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared.sources import source_group

__all__ = [
    "ConnectionBudget",
    "ConnectionLimits",
    "Exceeded",
    "PreAuthAdmission",
    "RateLimit",
    "source_group",
]


class PreAuthPeer(Protocol):
    """What admission needs of a connection: how far it got, and a way to end it."""

    def preauth_progress(self) -> int:
        """0: said nothing, 1: sent its SSH version, 2: asked to authenticate."""
        ...

    def evict(self, reason: str) -> None: ...


@dataclass(eq=False, slots=True)
class _Slot:
    peer: PreAuthPeer
    source: str


class PreAuthAdmission:
    """Unauthenticated connections: always admit, evict the oldest idle instead of refusing."""

    def __init__(self, *, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = min(max_per_source, max_total)
        # Insertion order is age: the first entry is the oldest.
        self._slots: OrderedDict[PreAuthPeer, _Slot] = OrderedDict()
        self._per_source: dict[str, int] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def count(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def admit(self, peer: PreAuthPeer, source: str) -> list[tuple[PreAuthPeer, str]]:
        """Take ``peer`` in; returns the (peer, reason) pairs the caller must evict now."""
        victims: list[tuple[PreAuthPeer, str]] = []
        if self.count(source) >= self.max_per_source:
            victim = self._oldest(lambda s: s.source == source)
            self._remove(victim)
            victims.append((victim, "source"))
        if len(self._slots) >= self.max_total:
            victim = self._oldest(lambda s: True)
            self._remove(victim)
            victims.append((victim, "total"))
        self._slots[peer] = _Slot(peer, source)
        self._per_source[source] = self.count(source) + 1
        self.evictions += len(victims)
        return victims

    def leave(self, peer: PreAuthPeer) -> bool:
        """``peer`` authenticated or went away; False if it held no slot (e.g. evicted)."""
        if peer not in self._slots:
            return False
        self._remove(peer)
        return True

    def _oldest(self, match: Callable[[_Slot], bool]) -> PreAuthPeer:
        """The oldest of the least advanced: idle ones go first, clients in auth last."""
        best: tuple[int, PreAuthPeer] | None = None
        for peer, slot in self._slots.items():
            if not match(slot):
                continue
            progress = peer.preauth_progress()
            if progress == 0:
                return peer
            if best is None or progress < best[0]:
                best = (progress, peer)
        assert best is not None, "a full pool or source always has an oldest entry"
        return best[1]

    def _remove(self, peer: PreAuthPeer) -> None:
        slot = self._slots.pop(peer)
        left = self._per_source[slot.source] - 1
        if left:
            self._per_source[slot.source] = left
        else:
            del self._per_source[slot.source]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection allowances (from the settings)."""

    max_channels: int = 4
    max_forward_requests: int = 16
    max_auth_tries: int = 6
    max_refusals: int = 32


class Exceeded(Exception):
    """A connection used up an allowance; ``kind`` is a bounded refusal kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class ConnectionBudget:
    """What one SSH connection has used of its :class:`ConnectionLimits`."""

    limits: ConnectionLimits
    channels: int = 0
    forward_requests: int = 0
    auth_tries: int = 0
    refusals: int = 0

    def channel(self) -> None:
        self.channels += 1
        if self.channels > self.limits.max_channels:
            raise Exceeded(
                "channel-limit", f"more than {self.limits.max_channels} channels on one connection"
            )

    def forward_request(self) -> None:
        self.forward_requests += 1
        if self.forward_requests > self.limits.max_forward_requests:
            raise Exceeded(
                "forward-limit",
                f"more than {self.limits.max_forward_requests} forward requests on one connection",
            )

    def auth_try(self) -> None:
        self.auth_tries += 1
        if self.auth_tries > self.limits.max_auth_tries:
            raise Exceeded(
                "auth-tries",
                f"more than {self.limits.max_auth_tries} authentication attempts on one connection",
            )

    def refused(self) -> bool:
        """Count one refusal; True once the connection has been refused too often."""
        self.refusals += 1
        return self.refusals > self.limits.max_refusals


@dataclass(slots=True)
class RateLimit:
    """A token bucket: ``rate`` events per second on average, bursts of ``burst``."""

    rate: float
    burst: float
    clock: Callable[[], float]
    _tokens: float = field(init=False)
    _last: float = field(init=False)

    def __post_init__(self) -> None:
        self._tokens = self.burst
        self._last = self.clock()

    def allow(self, n: int = 1) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < n:
            return False
        self._tokens -= n
        return True
