"""Defence in depth: one NetworkPolicy per Tunnel, the allow-list again at the network layer.

The forwarder's own check (:mod:`.sources`, ``status.allowedSources``) decides per connection;
a CNI that enforces NetworkPolicy can drop the packets before they reach it. Each Tunnel gets a
policy ``<tunnel name>`` in the forwarder namespace, owned by the Tunnel (garbage-collected with
it), selecting only the forwarder pod that holds the session (the label the forwarder puts on
its own pod) and opening only the session's listener ports, from

* the owner's pods, expressed with the user rules as selectors (namespace by its
  ``kubernetes.io/metadata.name`` label, the user label by value); where no selector can say it
  (an annotation rule), their current addresses as ``ipBlock``s, so the policy is never
  narrower than the forwarder's check;
* the Dask operator's pods (``operator_pod_selector`` in ``operator_namespace``);
* ``extra_allowed_sources`` as ``ipBlock``s.

Pod IPs are otherwise not written as ``ipBlock``: Kubernetes says those are for
cluster-external addresses. The static ``networkpolicy-forwarder.yaml`` opens SSH and metrics
only: under an enforcing CNI the session ports are reachable through these policies alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from daemons.reconciler import route
from daemons.reconciler.kube import TUNNEL_GROUP, TUNNEL_VERSION, Obj
from daemons.reconciler.verify import UserRules, user_slug

#: The label the forwarder puts on its own pod (daemons/forwarder/kube.py).
FORWARDER_POD_LABEL = "jobtunnel.io/forwarder-pod"
TUNNEL_LABEL = "jobtunnel.io/tunnel"
MANAGED_BY = "jobtunnel-reconciler"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def _label_values(user: str, scheme: str) -> list[str]:
    """What a user label may say (the name or its slug), as valid label values only."""
    return sorted({v for v in (user, user_slug(user, scheme)) if _LABEL_VALUE.fullmatch(v)})


def owner_peers(user: str, rules: UserRules) -> list[dict[str, Any]]:
    """The owner's pods as one NetworkPolicy peer (empty when no rule can be a selector)."""
    peer: dict[str, Any] = {}
    namespace = rules.expected_namespace(user)
    if namespace is not None:
        peer["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}
    if rules.label:
        values = _label_values(user, rules.slug_scheme)
        if not values:
            return []
        peer.setdefault("namespaceSelector", {})
        peer["podSelector"] = {
            "matchExpressions": [{"key": rules.label, "operator": "In", "values": values}]
        }
    return [peer] if peer else []


def desired_policy(
    tunnel: Obj,
    rules: UserRules,
    operator: Mapping[str, str],
    extra: Iterable[str],
    operator_namespace: str = "",
    allowed: Iterable[str] = (),
) -> Obj | None:
    """The Tunnel's NetworkPolicy, or None when there is nothing to open (no ports, no pod)."""
    meta = tunnel.get("metadata") or {}
    spec = tunnel.get("spec") or {}
    user = spec.get("user")
    forwarder = (spec.get("forwarder") or {}).get("podName")
    ports = sorted(set(route.session_ports(tunnel).values()))
    if not isinstance(user, str) or not isinstance(forwarder, str) or not forwarder or not ports:
        return None
    peers = owner_peers(user, rules)
    extra = list(extra)
    if not peers:
        # No selector says "the owner's pods" (an annotation rule, a name that is no label
        # value): their addresses then, or the policy would be narrower than the forwarder.
        extra = sorted(set(extra) | set(allowed))
    if operator and operator_namespace:
        peers.append(
            {
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: operator_namespace}},
                "podSelector": {"matchLabels": dict(operator)},
            }
        )
    peers.extend({"ipBlock": {"cidr": cidr}} for cidr in extra)
    # An empty "from" would admit everyone: with no peer, open nothing at all.
    ingress = (
        [{"from": peers, "ports": [{"protocol": "TCP", "port": port} for port in ports]}]
        if peers
        else []
    )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/part-of": "jobtunnel",
                TUNNEL_LABEL: meta.get("name"),
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{TUNNEL_GROUP}/{TUNNEL_VERSION}",
                    "kind": "Tunnel",
                    "name": meta.get("name"),
                    "uid": meta.get("uid"),
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "podSelector": {"matchLabels": {FORWARDER_POD_LABEL: forwarder}},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def needs_update(current: Obj, wanted: Obj) -> bool:
    cur_meta, want_meta = current.get("metadata") or {}, wanted["metadata"]
    return (
        current.get("spec") != wanted["spec"]
        or any((cur_meta.get("labels") or {}).get(k) != v for k, v in want_meta["labels"].items())
        or [r.get("uid") for r in cur_meta.get("ownerReferences") or []]
        != [r["uid"] for r in want_meta["ownerReferences"]]
    )
