"""Upstream fixes the released dask-kubernetes operator lacks, loaded beside it by the tests.

Not a fake: ``kopf run -m dask_kubernetes.operator.controller -m tests.dask_operator_backports``
runs the released operator unchanged, plus the handler below.

dask/dask-kubernetes#968 (fixed by PR #977, merged after 2026.3.0, not released yet): when the
scheduler Service's status handler runs before ``daskcluster_create_components`` returns, it
writes ``phase: Running`` and the create handler's ``phase: Pending`` lands after it; nothing
moves the phase again and ``KubeCluster`` fails with "Dask Cluster resource not actioned after
60 seconds". Seen here in about one ``KubeCluster`` start in ten on a loaded machine. The fix
derives the phase from the Service once the components exist; this handler does the same
whenever the phase becomes Pending. Drop it with the release that carries #977.
"""

from __future__ import annotations

from typing import Any

import kopf
from dask_kubernetes.operator._objects import DaskCluster
from kr8s.asyncio.objects import Service

#: Printed at import (tests/test_dask_operator_smoke.py looks for it in the operator's log).
LOADED = "jobtunnel tests: backport of dask/dask-kubernetes#977 loaded"

# On stdout, into the operator's log, at import: the tests check it is loaded (the handler
# itself runs only when kopf sees the phase at Pending, which it may coalesce away).
print(LOADED, flush=True)


@kopf.on.field("daskcluster.kubernetes.dask.org", field="status.phase", new="Pending")
async def phase_from_the_scheduler_service(
    name: str, namespace: str | None, logger: kopf.Logger, **_: Any
) -> None:
    assert namespace
    service = await Service.get(f"{name}-scheduler", namespace=namespace)
    spec, status = service.raw.get("spec") or {}, service.raw.get("status") or {}
    ingress = (status.get("loadBalancer") or {}).get("ingress")
    if spec.get("type") == "LoadBalancer" and not ingress:
        return  # Pending is right: the load balancer has no address yet
    cluster = await DaskCluster.get(name, namespace=namespace)
    await cluster.patch({"status": {"phase": "Running"}})
    logger.info("phase Running from the scheduler Service (dask/dask-kubernetes#968 backport)")
