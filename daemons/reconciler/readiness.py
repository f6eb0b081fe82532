"""Step 4 (issues 6, 10): make the scheduler pod ready the way kr8s checks it, and keep it so.

``KubeCluster`` waits, without a timeout, until kr8s' ``Pod.ready()`` sees *both* ``Ready`` and
``ContainersReady`` True (and ``Service.ready()`` asks the same of a pod the Service's selector
matches: the operator's selector, kept, selects this pod). InterLink's virtual kubelet sets only
``Ready``, and on every status loop it writes its own status back whole (UpdateStatus, not a
patch): the conditions list becomes ``[Ready]`` again, so a ``ContainersReady`` someone else
wrote is gone within one loop.

So this step is re-run by every change of the pod the watch delivers (the virtual kubelet's
write is such a change): a reconcile reads the pod, sees ``ContainersReady`` missing and patches
it back. No polling, and no fight: the patch is a strategic merge patch on the status
subresource without a resourceVersion, so it never conflicts; a virtual kubelet write that
races it fails with 409 on its side and is retried on its next loop. Only the watch's own
latency plus one reconcile separates a wipe from the re-assertion (``bench/
readiness_overwrite.py`` measures the fraction of time the pod reads ready). Setting
``ContainersReady`` next to ``Ready`` in InterLink's virtual kubelet would end this for good.

``status.conditions`` has ``type`` as its patch merge key, so only the named conditions change
and the others (PodScheduled, Initialized) stay as they are. kubernetes_asyncio picks strategic
merge for a dict body on PATCH by itself; the content type is still given explicitly so that a
client upgrade cannot silently turn this into a list-replacing merge patch. When the routing
goes, ``ContainersReady`` goes False before the endpoint goes (``Ready`` is left to the virtual
kubelet); the next virtual kubelet loop then drops the condition altogether, which reads as not
ready too, and no reconcile re-asserts it since no Tunnel claims the pod any more.
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
