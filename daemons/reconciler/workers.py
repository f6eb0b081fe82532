"""Step 3: tell a cluster's workers to dial the scheduler's private IP directly.

Workers offloaded to the same HTCondor pool cannot use the in-cluster Service, but they can
reach the scheduler job on its private IP. So ``DASK_SCHEDULER_ADDRESS`` is set on every
container of every DaskWorkerGroup of the cluster (new worker Deployments copy it) and of the
worker Deployments that already exist (the operator never updates those).

Each patched object records, in the ``jobtunnel.io/worker-env`` annotation, which Tunnel set the
value, the value set, and what each container had before (None: it had no such variable), so
cleanup restores exactly. Cleanup only reverts a container whose value is still ours: if someone
changed it since, their value wins. The operator copies a worker group's annotations into the
worker Deployments it creates, so a Deployment may carry the group's record without ever having
had a value of its own; for a Deployment, "had none" restores the address the operator would have
written (``tcp://<cluster>-scheduler.<namespace>.svc.cluster.local:8786``), because a worker
Deployment without the variable has no scheduler at all.

Both kinds are patched with a JSON merge patch replacing the containers list as read, guarded by
``metadata.resourceVersion``.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from daemons.reconciler.kube import WORKER_ENV_ANNOTATION, Obj, json_annotation

ENV_NAME = "DASK_SCHEDULER_ADDRESS"


def operator_default_address(cluster: str, namespace: str) -> str:
    return f"tcp://{cluster}-scheduler.{namespace}.svc.cluster.local:8786"


def scheduler_address(private_ip: str, port: int) -> str:
    host = f"[{private_ip}]" if ":" in private_ip else private_ip
    return f"tcp://{host}:{port}"


def containers_path(obj: Obj) -> tuple[str, ...]:
    """Where the pod template's containers are: worker group or Deployment."""
    if obj.get("kind") == "DaskWorkerGroup":
        return ("spec", "worker", "spec", "containers")
    return ("spec", "template", "spec", "containers")


def _get(obj: Obj, path: tuple[str, ...]) -> Any:
    cur: Any = obj
    for part in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _nest(path: tuple[str, ...], value: Any) -> Obj:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    assert isinstance(out, dict)
    return out


def _env_value(container: Obj) -> str | None:
    for item in container.get("env") or []:
        if item.get("name") == ENV_NAME:
            value = item.get("value")
            return value if isinstance(value, str) else None
    return None


def _with_env(container: Obj, value: str | None) -> Obj:
    """A copy of ``container`` whose env has ENV_NAME = value (removed when value is None).

    An existing entry is replaced where it stands, to keep the order (and the diff) minimal.
    """
    out = copy.deepcopy(container)
    env: list[Obj] = []
    placed = False
    for item in out.get("env") or []:
        if item.get("name") != ENV_NAME:
            env.append(item)
        elif value is not None and not placed:
            env.append({"name": ENV_NAME, "value": value})
            placed = True
    if value is not None and not placed:
        env.append({"name": ENV_NAME, "value": value})
    if env:
        out["env"] = env
    else:
        out.pop("env", None)
    return out


def record_of(obj: Obj) -> dict[str, Any] | None:
    data = json_annotation(obj, WORKER_ENV_ANNOTATION)
    return data if isinstance(data, dict) and isinstance(data.get("tunnel"), str) else None


def set_patch(obj: Obj, tunnel_key: str, address: str) -> Obj | None:
    """Merge patch setting the address on every container; None when already so."""
    path = containers_path(obj)
    containers = _get(obj, path) or []
    record = record_of(obj)
    previous: dict[str, str | None] = {}
    if record is not None and isinstance(record.get("previous"), dict):
        previous = dict(record["previous"])
    changed = False
    new_containers = []
    for container in containers:
        name = str(container.get("name", ""))
        current = _env_value(container)
        if current != address:
            changed = True
            # Only the value before our first change is worth remembering.
            if name not in previous:
                previous[name] = current
        elif name not in previous and record is None:
            previous[name] = current
        new_containers.append(_with_env(container, address))
    wanted = {"tunnel": tunnel_key, "value": address, "previous": previous}
    if (
        not changed
        and record is not None
        and record.get("tunnel") == tunnel_key
        and (record.get("value") == address)
    ):
        return None
    return {
        "metadata": {
            "resourceVersion": (obj.get("metadata") or {}).get("resourceVersion"),
            "annotations": {WORKER_ENV_ANNOTATION: json.dumps(wanted, sort_keys=True)},
        },
        **_nest(path, new_containers),
    }


def restore_patch(obj: Obj, cluster: str | None, namespace: str) -> Obj | None:
    """Merge patch undoing :func:`set_patch` (None: nothing of ours there)."""
    record = record_of(obj)
    if record is None:
        return None
    ours = record.get("value")
    previous = record.get("previous") if isinstance(record.get("previous"), dict) else {}
    assert isinstance(previous, dict)
    is_deployment = obj.get("kind") != "DaskWorkerGroup"
    path = containers_path(obj)
    new_containers = []
    for container in _get(obj, path) or []:
        name = str(container.get("name", ""))
        if _env_value(container) != ours:
            new_containers.append(container)
            continue
        before = previous.get(name)
        if before is None and is_deployment and cluster:
            before = operator_default_address(cluster, namespace)
        new_containers.append(_with_env(container, before))
    return {
        "metadata": {
            "resourceVersion": (obj.get("metadata") or {}).get("resourceVersion"),
            "annotations": {WORKER_ENV_ANNOTATION: None},
        },
        **_nest(path, new_containers),
    }
