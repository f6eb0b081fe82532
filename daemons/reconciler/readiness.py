"""Step 4 (issue 6): make the scheduler pod ready the way kr8s checks it.

``KubeCluster`` waits, without a timeout, until kr8s' ``Pod.ready()`` sees *both* ``Ready`` and
``ContainersReady`` True. InterLink's virtual kubelet sets only ``Ready``. The scheduler is
reachable once its Tunnel is routed, so that is when ``ContainersReady`` (and ``Ready``) are set
True; they are re-asserted whenever a watch shows them reset, and ``ContainersReady`` goes False
when the routing goes (``Ready`` is left to the virtual kubelet then).

The patch is a strategic merge patch on the pod's status subresource: ``status.conditions``
has ``type`` as its patch merge key, so only the named conditions change and the kubelet's own
conditions (PodScheduled, Initialized) stay as they are. kubernetes_asyncio picks strategic merge
for a dict body on PATCH by itself; the content type is still given explicitly so that a
client upgrade cannot silently turn this into a list-replacing merge patch.
"""

from __future__ import annotations

from daemons.reconciler.kube import Obj, rfc3339

REASON = "JobtunnelRouted"


def condition(pod: Obj, kind: str) -> Obj | None:
    for item in (pod.get("status") or {}).get("conditions") or []:
        if item.get("type") == kind:
            return dict(item)
    return None


def is_ready(pod: Obj) -> bool:
    return all(
        (condition(pod, kind) or {}).get("status") == "True"
        for kind in ("Ready", "ContainersReady")
    )


def ready_patch(pod: Obj, ready: bool) -> Obj | None:
    """The status patch making the pod ready (or ContainersReady False); None if already so."""
    wanted = {"ContainersReady": "True", "Ready": "True"} if ready else {"ContainersReady": "False"}
    changes = []
    for kind, status in wanted.items():
        current = condition(pod, kind)
        if current is not None and current.get("status") == status:
            continue
        if current is None and status == "False":
            continue  # absent already means not ready; don't invent a condition
        item: Obj = {"type": kind, "status": status, "lastTransitionTime": rfc3339()}
        if status == "True":
            item["reason"] = REASON
            item["message"] = "the scheduler is reachable through its jobtunnel session"
        else:
            item["reason"] = "JobtunnelUnrouted"
            item["message"] = "the scheduler's jobtunnel session is gone"
        changes.append(item)
    if not changes:
        return None
    return {"status": {"conditions": changes}}
