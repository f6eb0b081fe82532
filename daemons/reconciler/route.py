"""Step 2: route the Dask operator's ``<cluster>-scheduler`` Service to the forwarder pod.

The Service is never modified. Its selector stays the operator's (kr8s' ``Service.ready()``
lists the pods it selects and needs one Ready and ContainersReady), and beside the slices the
EndpointSlice controller makes for that selector the reconciler keeps one EndpointSlice of its
own, ``<service>-jobtunnel`` in the Service's namespace:

- labels ``kubernetes.io/service-name: <service>`` (kube-proxy merges every slice carrying it,
  whoever manages it) and ``endpointslice.kubernetes.io/managed-by: reconciler.jobtunnel.io``
  (the EndpointSlice controller only touches slices managed by ``endpointslice-controller.k8s.io``,
  so it leaves this one alone);
- an owner reference to the Service, so the garbage collector deletes it with the Service (a
  deleted DaskCluster leaves nothing behind, even when the reconciler is down);
- one endpoint at the holding forwarder pod's IP, ``ready`` as that pod is, and one port per
  Service port the session carries, under the Service port's *name* (kube-proxy matches slice
  ports to Service ports by name; the number is the session's listener port).

Why this and not the Service rewrite it replaces: a Service selects pods of its own namespace
only, so a forwarder in its own namespace could never be selected; an EndpointSlice's address is
just an IP, in any namespace. The endpoint controllers still select the scheduler pod too, whose
IP under InterLink is 127.0.0.1 by default: API validation rejects loopback addresses, so they
publish nothing for it (and say so in warning Events on the Service). A virtual kubelet that
reports a routable but unreachable pod IP would add a dead endpoint beside ours: see the docs.

``jobtunnel.io/routed-by`` on the slice records which Tunnel routed it and which scheduler pod
was made ready: that is how the reconciler finds what to undo after a Tunnel is gone, even across
its own restarts. Writes are a create (409 AlreadyExists: read and patch) or a JSON merge patch
carrying ``metadata.resourceVersion`` (a 409 when someone wrote in between, and the caller
recomputes); a delete carries the slice's UID as precondition.

The API version is chosen once at start by discovery: ``discovery.k8s.io/v1`` where served
(1.21+), ``v1beta1`` otherwise (1.20 and older); the fields used here mean the same in both.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from daemons.reconciler.kube import CLUSTER_LABEL, ROUTED_BY_ANNOTATION, Obj, json_annotation

DISCOVERY_GROUP = "discovery.k8s.io"
SLICE_PLURAL = "endpointslices"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
#: Our managed-by value: anything but the EndpointSlice controller's own keeps it off our slice.
MANAGED_BY = "reconciler.jobtunnel.io"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"

#: Service port name / port number -> the session service name it carries.
PORT_NAMES = {"tcp-comm": "scheduler", "http-dashboard": "dashboard"}
PORT_NUMBERS = {8786: "scheduler", 8787: "dashboard"}


def choose_version(group: Obj) -> str:
    """``v1`` when discovery lists it for discovery.k8s.io, else ``v1beta1``."""
    versions = {v.get("version") for v in group.get("versions") or [] if isinstance(v, dict)}
    return "v1" if "v1" in versions else "v1beta1"


def scheduler_service_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


def slice_name(service: str) -> str:
    return f"{service}-jobtunnel"


def session_ports(tunnel: Obj) -> dict[str, int]:
    """Service name -> listener port on the forwarder pod."""
    result: dict[str, int] = {}
    for item in (tunnel.get("spec") or {}).get("services") or []:
        name, port = item.get("name"), item.get("port")
        if isinstance(name, str) and isinstance(port, int) and not isinstance(port, bool):
            result[name] = port
    return result


def remote_port(tunnel: Obj, service: str) -> int | None:
    """The service's own port inside the job (what workers dial on the private IP)."""
    for item in (tunnel.get("spec") or {}).get("services") or []:
        if item.get("name") == service:
            port = item.get("remotePort")
            if isinstance(port, int) and not isinstance(port, bool):
                return port
    return None


def service_for_port(port: Obj) -> str | None:
    name = port.get("name")
    if isinstance(name, str) and name in PORT_NAMES:
        return PORT_NAMES[name]
    number = port.get("port")
    if isinstance(number, int) and number in PORT_NUMBERS:
        return PORT_NUMBERS[number]
    return name if isinstance(name, str) and name else None


@dataclass(frozen=True)
class RoutedBy:
    """Who routed a Service: the Tunnel key and the scheduler pod made ready for it."""

    tunnel: str
    pod_namespace: str
    pod_name: str
    pod_uid: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "tunnel": self.tunnel,
                "pod": {
                    "namespace": self.pod_namespace,
                    "name": self.pod_name,
                    "uid": self.pod_uid,
                },
            },
            sort_keys=True,
        )


def routed_by(obj: Obj) -> RoutedBy | None:
    data = json_annotation(obj, ROUTED_BY_ANNOTATION)
    if not isinstance(data, dict) or not isinstance(data.get("tunnel"), str):
        return None
    pod = data.get("pod") if isinstance(data.get("pod"), dict) else {}
    assert isinstance(pod, dict)
    return RoutedBy(
        data["tunnel"],
        str(pod.get("namespace", "")),
        str(pod.get("name", "")),
        str(pod.get("uid", "")),
    )


@dataclass(frozen=True)
class ForwarderEndpoint:
    """The holding forwarder pod as an endpoint: its IP, readiness and identity."""

    ip: str
    ready: bool
    namespace: str
    name: str
    uid: str


def forwarder_endpoint(pod: Obj | None) -> ForwarderEndpoint | None:
    """None when there is no pod or it has no usable IP yet."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not isinstance(ip, str) or not ip:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.is_loopback or address.is_unspecified:
        return None  # API validation would refuse it anyway
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    meta = pod.get("metadata") or {}
    return ForwarderEndpoint(
        ip,
        ready and status.get("phase") == "Running",
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        str(meta.get("uid", "")),
    )


def slice_ports(service: Obj, ports: dict[str, int]) -> list[Obj]:
    """One slice port per Service port the session carries, named as the Service port."""
    out: list[Obj] = []
    for port in (service.get("spec") or {}).get("ports") or []:
        if (port.get("protocol") or "TCP") != "TCP":
            continue
        carried = service_for_port(port)
        if carried is not None and carried in ports:
            out.append({"name": port.get("name") or "", "port": ports[carried], "protocol": "TCP"})
    return out


def desired_slice(
    service: Obj, endpoint: ForwarderEndpoint, ports: dict[str, int], by: RoutedBy, version: str
) -> Obj:
    """The EndpointSlice routing ``service`` to ``endpoint`` (see the module docstring)."""
    meta = service.get("metadata") or {}
    name = str(meta.get("name"))
    labels = {SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY}
    cluster = (meta.get("labels") or {}).get(CLUSTER_LABEL)
    if isinstance(cluster, str) and cluster:
        labels[CLUSTER_LABEL] = cluster
    family = ipaddress.ip_address(endpoint.ip).version
    return {
        "apiVersion": f"{DISCOVERY_GROUP}/{version}",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(name),
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": {ROUTED_BY_ANNOTATION: by.to_json()},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": name, "uid": meta.get("uid")}
            ],
        },
        "addressType": "IPv4" if family == 4 else "IPv6",
        "endpoints": [
            {
                "addresses": [endpoint.ip],
                "conditions": {"ready": endpoint.ready},
                "targetRef": {
                    "kind": "Pod",
                    "namespace": endpoint.namespace,
                    "name": endpoint.name,
                    "uid": endpoint.uid,
                },
            }
        ],
        "ports": slice_ports(service, ports),
    }


def _routing_view(obj: Obj) -> tuple[Any, ...]:
    """What a slice routes and claims; server-filled fields (defaults, times) left out."""
    meta = obj.get("metadata") or {}
    endpoints = [
        (
            tuple(e.get("addresses") or []),
            bool((e.get("conditions") or {}).get("ready", True)),
            json.dumps(e.get("targetRef") or {}, sort_keys=True),
        )
        for e in obj.get("endpoints") or []
    ]
    ports = [
        (p.get("name") or "", p.get("port"), p.get("protocol") or "TCP")
        for p in obj.get("ports") or []
    ]
    owners = [
        (o.get("kind"), o.get("name"), o.get("uid")) for o in meta.get("ownerReferences") or []
    ]
    labels = meta.get("labels") or {}
    wanted_labels = {
        k: labels.get(k) for k in (SERVICE_NAME_LABEL, MANAGED_BY_LABEL, CLUSTER_LABEL)
    }
    return (
        obj.get("addressType"),
        endpoints,
        ports,
        owners,
        json.dumps(wanted_labels, sort_keys=True),
        (meta.get("annotations") or {}).get(ROUTED_BY_ANNOTATION),
    )


def slice_patch(current: Obj, wanted: Obj) -> Obj | None:
    """The merge patch turning ``current`` into ``wanted``; None when it already routes so."""
    if _routing_view(current) == _routing_view(wanted):
        return None
    meta = wanted["metadata"]
    return {
        "metadata": {
            "resourceVersion": (current.get("metadata") or {}).get("resourceVersion"),
            "labels": meta["labels"],
            "annotations": meta["annotations"],
            "ownerReferences": meta["ownerReferences"],
        },
        # addressType is immutable; a change of IP family means delete and create (caller).
        "endpoints": wanted["endpoints"],
        "ports": wanted["ports"],
    }


def family_changed(current: Obj, wanted: Obj) -> bool:
    return current.get("addressType") != wanted.get("addressType")
