"""The real dask-kubernetes operator against the real test apiserver (see tests/dask_operator.py).

These pin down the facts the reconciler builds on: which objects the operator makes for a
DaskCluster and what they look like, that a virtual-kubelet-style pod is Ready but not
ContainersReady, that scaling adds a worker Deployment, that deletion is left to the garbage
collector, and that none of this makes kopf log failures or retries.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client

from tests.dask_operator import (
    VIRTUAL_NODE,
    VIRTUAL_NODE_SELECTOR,
    VIRTUAL_NODE_TAINT,
    VIRTUAL_NODE_TOLERATIONS,
    DaskOperator,
    dask_operator,  # noqa: F401
    wait_for,
)
from tests.kube import kube_api  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def namespace(dask_operator: DaskOperator) -> AsyncIterator[str]:  # noqa: F811
    name = f"dask-{uuid.uuid4().hex[:8]}"
    async with dask_operator.api() as api:
        core = client.CoreV1Api(api)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        yield name
        await core.delete_namespace(name)


def env_of(deployment: client.V1Deployment) -> dict[str, str | None]:
    container = deployment.spec.template.spec.containers[0]
    return {e.name: e.value for e in container.env or []}


async def test_operator_is_ready(dask_operator: DaskOperator) -> None:  # noqa: F811
    assert dask_operator.running()
    # Visible with `pytest -s`/on failure: how long the session fixture took.
    print(
        f"dask CRDs established in {dask_operator.crds_seconds:.1f}s; "
        f"dask operator {dask_operator.version}: live after {dask_operator.live_seconds:.1f}s, "
        f"handled a DaskCluster after {dask_operator.ready_seconds:.1f}s"
    )
    assert dask_operator.problems() == []
    # The backported upstream fix is loaded beside the released controller (it says so at
    # import: tests.dask_operator_backports.LOADED).
    assert "jobtunnel tests: backport of dask/dask-kubernetes#977 loaded" in dask_operator.log()


async def test_cluster_lifecycle(dask_operator: DaskOperator, namespace: str) -> None:  # noqa: F811
    since = dask_operator.log_offset()
    name = "analysis"
    started = time.monotonic()
    created = await dask_operator.create_cluster(
        namespace,
        name,
        n_workers=1,
        worker_node_selector=VIRTUAL_NODE_SELECTOR,
        worker_tolerations=VIRTUAL_NODE_TOLERATIONS,
    )
    assert created["metadata"]["name"] == name

    objects = await dask_operator.wait_for_objects(namespace, name)
    created_in = time.monotonic() - started

    # The scheduler: a one-replica Deployment placed on the virtual node.
    scheduler = objects.scheduler_deployment
    assert scheduler.metadata.name == f"{name}-scheduler"
    assert scheduler.spec.replicas == 1
    assert scheduler.spec.template.spec.node_selector == dict(VIRTUAL_NODE_SELECTOR)
    assert [t.key for t in scheduler.spec.template.spec.tolerations] == [VIRTUAL_NODE_TAINT["key"]]
    assert scheduler.spec.template.metadata.labels["dask.org/cluster-name"] == name
    assert scheduler.spec.template.metadata.labels["dask.org/component"] == "scheduler"
    assert scheduler.metadata.owner_references[0].kind == "DaskCluster"

    # The Service the reconciler will route.
    service = objects.service
    assert service.metadata.name == f"{name}-scheduler"
    ports = {p.name: (p.port, p.target_port) for p in service.spec.ports}
    assert ports == {"tcp-comm": (8786, "tcp-comm"), "http-dashboard": (8787, "http-dashboard")}
    assert service.spec.selector == {
        "dask.org/cluster-name": name,
        "dask.org/component": "scheduler",
    }

    # The default worker group and its one worker Deployment, told the in-cluster address.
    group = objects.worker_group
    assert group["metadata"]["name"] == f"{name}-default"
    assert group["spec"]["cluster"] == name
    assert group["spec"]["worker"]["replicas"] == 1
    assert len(objects.worker_deployments) == 1
    first_worker = objects.worker_deployments[0]
    assert first_worker.metadata.name.startswith(f"{name}-default-worker-")
    assert (
        env_of(first_worker)["DASK_SCHEDULER_ADDRESS"]
        == f"tcp://{name}-scheduler.{namespace}.svc.cluster.local:8786"
    )

    # The "virtual kubelet": bound to the virtual node, Running, Ready but not ContainersReady.
    pod = await dask_operator.run_pod(namespace, scheduler.metadata.name)
    assert pod.spec.node_name == VIRTUAL_NODE
    assert pod.status.phase == "Running"
    assert pod.status.pod_ip.startswith("10.244.")
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["Ready"] == "True"
    assert "ContainersReady" not in conditions
    assert pod.metadata.labels["dask.org/cluster-name"] == name

    # Ready is enough for the endpoints controller: the unpatched Service finds the pod.
    async def endpoint_lists_pod() -> bool:
        async with dask_operator.api() as api:
            endpoints = await client.CoreV1Api(api).read_namespaced_endpoints(
                f"{name}-scheduler", namespace
            )
        return any(
            a.ip == pod.status.pod_ip for s in endpoints.subsets or [] for a in s.addresses or []
        )

    await wait_for(endpoint_lists_pod, 60, "the scheduler Service's Endpoints to list the pod")

    # Scale-up: a second worker Deployment; the first one is kept.
    started_scale = time.monotonic()
    await dask_operator.scale(namespace, name, 2)
    scaled = await dask_operator.wait_for_objects(namespace, name, n_workers=2)
    scaled_in = time.monotonic() - started_scale
    assert scaled.worker_group["spec"]["worker"]["replicas"] == 2
    assert first_worker.metadata.name in {d.metadata.name for d in scaled.worker_deployments}
    # Workers are offloaded too.
    worker_pod = await dask_operator.run_pod(namespace, scaled.worker_deployments[1].metadata.name)
    assert worker_pod.spec.node_name == VIRTUAL_NODE

    # Deleting the DaskCluster: the garbage collector removes every child, pods included.
    started_delete = time.monotonic()
    await dask_operator.delete_cluster(namespace, name)
    await dask_operator.wait_for_cluster_gone(namespace, name)
    deleted_in = time.monotonic() - started_delete
    print(
        f"objects created in {created_in:.1f}s, scaled in {scaled_in:.1f}s, "
        f"gone in {deleted_in:.1f}s"
    )

    dask_operator.check_alive()
    assert dask_operator.problems(since) == [], dask_operator.log()[since:]
