"""Who may reach a tunnel: the allow-list the reconciler writes into each Tunnel's status.

The forwarder checks every in-cluster connection to a tunnelled service against
``status.allowedSources`` before a byte is forwarded. It has no read access to pods, so the
reconciler, which already has it, computes the list: the pod IPs of the owning user's pods (by
the rules verification uses: namespace, label, annotation), of the Dask operator's pods (it
talks to the scheduler to scale), and the configured extra CIDRs. Pure functions here; the
controller feeds them its pod cache and writes the result.

The pod cache is trimmed to what this needs (:func:`trim_pod`): watching every pod of a large
cluster must not mean holding every pod spec in memory.

Known window (documented): a pod that ends frees its IP; until its deletion event arrives and
the Tunnel is reconciled again (typically well under a second), a new pod given that IP is let
in. Pods that finished (Succeeded/Failed) are never listed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from daemons.reconciler.kube import Obj, key_of, labels_of
from daemons.reconciler.verify import UserRules, user_slug

#: The CRD's bounds: refused peers per list the forwarder reports, the keys of both lists we
#: remember having reported, and allow-list entries.
MAX_REPORTED = 64
MAX_REPORTED_KEYS = 2 * MAX_REPORTED
MAX_ALLOWED = 1024


def trim_pod(pod: Obj, annotation: str = "") -> Obj:
    """The part of a pod the allow-list needs: identity, labels, the one annotation a user rule
    reads, whether a controller owns it, IPs, phase (not ``last-applied-configuration``)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    owners = meta.get("ownerReferences") or []
    return {
        "kind": "Pod",
        "metadata": {
            **{
                key: meta[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "labels")
                if key in meta
            },
            "annotations": {annotation: annotations[annotation]}
            if annotation in annotations
            else {},
            "ownerReferences": [
                {"kind": r.get("kind"), "controller": bool(r.get("controller"))} for r in owners
            ],
        },
        "status": {
            "phase": status.get("phase"),
            "podIPs": status.get("podIPs") or [],
            "podIP": status.get("podIP"),
            "hostIP": status.get("hostIP"),
        },
    }


def has_controller(pod: Obj) -> bool:
    return any(
        r.get("controller") for r in (pod.get("metadata") or {}).get("ownerReferences") or []
    )


def pod_ips(pod: Obj) -> list[str]:
    """The pod's IPs (both families), none for a pod that finished or is not on a node yet."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return []
    found = [str(entry.get("ip")) for entry in status.get("podIPs") or [] if entry.get("ip")]
    if not found and status.get("podIP"):
        found = [str(status["podIP"])]
    # A host-network pod's address is its node's: letting it in would let the whole node in.
    return [ip for ip in found if ip != status.get("hostIP")]


def selected(pod: Obj, selector: Mapping[str, str]) -> bool:
    labels = labels_of(pod)
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def is_operator(pod: Obj, namespace: str, selector: Mapping[str, str]) -> bool:
    """The Dask operator's pod: its labels *and* its namespace (anyone can copy labels)."""
    if not namespace:
        return False
    return (pod.get("metadata") or {}).get("namespace") == namespace and selected(pod, selector)


def owned_by_user(pod: Obj, user: str, rules: UserRules) -> bool:
    """The user rules, and where no namespace is the user's own, only pods nobody controls.

    In a namespace shared by all users, labels are whatever a pod's creator wrote, and the Dask
    operator copies a DaskCluster's labels into the pods it makes: anyone could make a pod that
    names another user. The hub's own pods (KubeSpawner makes bare pods) are the ones left.
    """
    if not rules.owns(pod, user):
        return False
    return rules.expected_namespace(user) is not None or not has_controller(pod)


def host_network(ip: str) -> str | None:
    """``10.1.2.3`` -> ``10.1.2.3/32``; None for what is not an IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return f"{addr}/{addr.max_prefixlen}"


def allowed_sources(
    user: str,
    pods: Iterable[Obj],
    rules: UserRules,
    operator: Mapping[str, str],
    extra: Iterable[str] = (),
    operator_namespace: str = "",
) -> list[str]:
    """The sorted CIDRs that may reach ``user``'s tunnel."""
    found = set(extra)
    for pod in pods:
        if owned_by_user(pod, user, rules) or is_operator(pod, operator_namespace, operator):
            for ip in pod_ips(pod):
                network = host_network(ip)
                if network is not None:
                    found.add(network)
    return sorted(found)


#: Refused claimants' keys in ``reportedRefusals`` (refused sources are the bare address).
CLAIM_PREFIX = "claim:"
#: What the forwarder reports: status field -> key prefix.
REFUSAL_FIELDS = (("refusedSources", ""), ("refusedClaims", CLAIM_PREFIX))


def _refusals(tunnel: Obj) -> list[tuple[str, dict[str, Any]]]:
    status = tunnel.get("status") or {}
    if status.get("refusalsSessionId") != (tunnel.get("spec") or {}).get("sessionId"):
        return []  # a previous session's, or none yet: not this session's news
    found = []
    for name, prefix in REFUSAL_FIELDS:
        for entry in (status.get(name) or [])[:MAX_REPORTED]:
            if isinstance(entry, dict):
                found.append((prefix + str(entry.get("address")), entry))
    return found


def refused_addresses(tunnel: Obj) -> tuple[str, ...]:
    """What the forwarder says it refused, as a comparable tuple (it triggers a reconcile)."""
    return tuple(sorted(key for key, _ in _refusals(tunnel)))


def reported(tunnel: Obj) -> set[str]:
    """Refusals already told (this session's: a new session starts a new record)."""
    status = tunnel.get("status") or {}
    if status.get("observedSessionId") != (tunnel.get("spec") or {}).get("sessionId"):
        return set()
    return {str(key) for key in status.get("reportedRefusals") or []}


def unreported(tunnel: Obj) -> list[tuple[str, dict[str, Any]]]:
    """Refusals the forwarder reported that no Event has told the owner about yet:
    (key, entry), the key an address, or ``claim:`` and the claimant's address."""
    done = reported(tunnel)
    return [(key, entry) for key, entry in _refusals(tunnel) if key not in done]


class OwnerIndex:
    """Tunnel keys by what their owner's pods carry: a pod event costs a lookup, not a scan.

    The reconciler sees every pod of the cluster; scanning every Tunnel for each would be
    pods x tunnels at each relist. The most selective user rule is the key (the namespace, else
    the user label's value); with only an annotation rule every Tunnel is a candidate.
    """

    def __init__(self, rules: UserRules) -> None:
        self.rules = rules
        self._user: dict[str, str] = {}
        self._by_token: dict[tuple[str, str], set[str]] = {}

    def _tokens(self, user: str) -> list[tuple[str, str]]:
        namespace = self.rules.expected_namespace(user)
        if namespace is not None:
            return [("ns", namespace)]
        if self.rules.label:
            return [("label", v) for v in {user, user_slug(user, self.rules.slug_scheme)}]
        return [("any", "")]

    def set(self, key: str, user: str | None) -> None:
        self.remove(key)
        if user:
            self._user[key] = user
            for token in self._tokens(user):
                self._by_token.setdefault(token, set()).add(key)

    def remove(self, key: str) -> None:
        user = self._user.pop(key, None)
        if user is None:
            return
        for token in self._tokens(user):
            keys = self._by_token.get(token)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_token[token]

    def owners_of(self, pod: Obj) -> list[str]:
        """The Tunnel keys whose user owns ``pod`` by every rule."""
        meta = pod.get("metadata") or {}
        candidates = set(self._by_token.get(("ns", str(meta.get("namespace"))), ()))
        if self.rules.label:
            value = str(labels_of(pod).get(self.rules.label))
            candidates |= self._by_token.get(("label", value), set())
        candidates |= self._by_token.get(("any", ""), set())
        return sorted(k for k in candidates if owned_by_user(pod, self._user[k], self.rules))


class PodIndex:
    """Pod keys by namespace and by the user label's value: a Tunnel's allow-list reads the
    pods its rules can match, not every pod of the cluster, on each reconcile."""

    def __init__(self, rules: UserRules) -> None:
        self.rules = rules
        self._by_ns: dict[str, set[str]] = {}
        self._by_label: dict[str, set[str]] = {}
        self._where: dict[str, tuple[str, str | None]] = {}

    def update(self, kind: str, pod: Obj) -> None:
        meta = pod.get("metadata") or {}
        key = key_of(pod)
        previous = self._where.pop(key, None)
        if previous is not None:
            _discard(self._by_ns, previous[0], key)
            if previous[1] is not None:
                _discard(self._by_label, previous[1], key)
        if kind == "DELETED":
            return
        ns = str(meta.get("namespace"))
        value = labels_of(pod).get(self.rules.label) if self.rules.label else None
        self._by_ns.setdefault(ns, set()).add(key)
        if value is not None:
            self._by_label.setdefault(str(value), set()).add(key)
        self._where[key] = (ns, None if value is None else str(value))

    def candidates(self, cache: Mapping[str, Obj], user: str, operator_namespace: str) -> list[Obj]:
        namespace = self.rules.expected_namespace(user)
        if namespace is not None:
            keys = set(self._by_ns.get(namespace, ()))
        elif self.rules.label:
            keys = set()
            for value in {user, user_slug(user, self.rules.slug_scheme)}:
                keys |= self._by_label.get(value, set())
        else:
            keys = set(cache)  # an annotation rule only: no index can narrow it
        if operator_namespace:
            keys |= self._by_ns.get(operator_namespace, set())
        return [cache[k] for k in sorted(keys) if k in cache]


def _discard(index: dict[str, set[str]], token: str, key: str) -> None:
    keys = index.get(token)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[token]
