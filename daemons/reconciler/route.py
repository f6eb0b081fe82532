"""Step 2: point the Dask operator's ``<cluster>-scheduler`` Service at the forwarder pod.

The Service keeps a selector (kr8s' ``Service.ready()`` reads it, and the endpoints controller
needs one): ``jobtunnel.io/forwarder-pod: <pod name>``, the label each forwarder pod carries.
Each port's ``targetPort`` becomes the session's listener port for that service. Kubernetes'
endpoints controller then does the rest, so there is no data path in the reconciler at all.

What was there before is kept in the ``jobtunnel.io/original`` annotation (selector + ports,
exactly as the API server returned them) and restored exactly, and ``jobtunnel.io/routed-by``
records which Tunnel routed it and which scheduler pod was made ready: that annotation is how
the reconciler finds what to undo after a Tunnel is gone, even across its own restarts.

Patches are JSON merge patches carrying ``metadata.resourceVersion``: the API server applies
them only to the version they were computed from (a 409 otherwise, and the caller recomputes).
A merge patch merges maps, so the old selector keys are nulled explicitly; lists (ports) are
replaced whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from daemons.reconciler.kube import (
    FORWARDER_POD_LABEL,
    ORIGINAL_ANNOTATION,
    ROUTED_BY_ANNOTATION,
    Obj,
    annotations_of,
    json_annotation,
)

#: Service port name / port number -> the session service name it carries.
PORT_NAMES = {"tcp-comm": "scheduler", "http-dashboard": "dashboard"}
PORT_NUMBERS = {8786: "scheduler", 8787: "dashboard"}


def scheduler_service_name(cluster: str) -> str:
    return f"{cluster}-scheduler"


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


def routed_by(service: Obj) -> RoutedBy | None:
    data = json_annotation(service, ROUTED_BY_ANNOTATION)
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


def original_of(service: Obj) -> dict[str, Any]:
    """The pre-routing selector and ports: from the annotation if routed, else the live spec."""
    saved = json_annotation(service, ORIGINAL_ANNOTATION)
    if isinstance(saved, dict) and "ports" in saved:
        return saved
    spec = service.get("spec") or {}
    return {"selector": spec.get("selector"), "ports": spec.get("ports") or []}


def routed_spec(original: dict[str, Any], forwarder_pod: str, ports: dict[str, int]) -> Obj:
    """The routed selector and ports computed from the original ones (never from a routed one)."""
    new_ports = []
    for port in original.get("ports") or []:
        routed = dict(port)
        service = service_for_port(port)
        if service is not None and service in ports:
            routed["targetPort"] = ports[service]
        new_ports.append(routed)
    return {"selector": {FORWARDER_POD_LABEL: forwarder_pod}, "ports": new_ports}


def _selector_patch(current: dict[str, str] | None, wanted: dict[str, str] | None) -> Any:
    """A merge-patch value turning ``current`` into ``wanted`` (maps merge, so null the rest)."""
    if wanted is None:
        return None
    patch: dict[str, str | None] = {k: None for k in (current or {}) if k not in wanted}
    patch.update(wanted)
    return patch


def route_patch(service: Obj, routed: Obj, by: RoutedBy) -> Obj | None:
    """The merge patch routing ``service``; None when it is already exactly so."""
    spec = service.get("spec") or {}
    original = original_of(service)
    ann = annotations_of(service)
    original_json = json.dumps(original, sort_keys=True)
    by_json = by.to_json()
    if (
        spec.get("selector") == routed["selector"]
        and spec.get("ports") == routed["ports"]
        and ann.get(ORIGINAL_ANNOTATION) is not None
        and ann.get(ROUTED_BY_ANNOTATION) == by_json
    ):
        return None
    keep_original = ann.get(ORIGINAL_ANNOTATION) or original_json
    return {
        "metadata": {
            "resourceVersion": (service.get("metadata") or {}).get("resourceVersion"),
            "annotations": {ORIGINAL_ANNOTATION: keep_original, ROUTED_BY_ANNOTATION: by_json},
        },
        "spec": {
            "selector": _selector_patch(spec.get("selector"), routed["selector"]),
            "ports": routed["ports"],
        },
    }


def restore_patch(service: Obj) -> Obj | None:
    """The merge patch giving ``service`` back its original selector and ports (None: not ours)."""
    ann = annotations_of(service)
    if ORIGINAL_ANNOTATION not in ann and ROUTED_BY_ANNOTATION not in ann:
        return None
    spec = service.get("spec") or {}
    saved = json_annotation(service, ORIGINAL_ANNOTATION)
    patch: Obj = {
        "metadata": {
            "resourceVersion": (service.get("metadata") or {}).get("resourceVersion"),
            "annotations": {ORIGINAL_ANNOTATION: None, ROUTED_BY_ANNOTATION: None},
        }
    }
    if isinstance(saved, dict) and "ports" in saved:
        patch["spec"] = {
            "selector": _selector_patch(spec.get("selector"), saved.get("selector")),
            "ports": saved.get("ports") or [],
        }
    return patch
