"""The real dask-kubernetes operator, run against the real test apiserver, plus a "virtual kubelet".

The operator (PyPI ``dask-kubernetes``, kopf-based) is what creates a Dask cluster's objects in
production; the reconciler patches those objects, so tests use the real thing instead of
hand-made copies. It runs outside the cluster, as a subprocess::

    python -m kopf run -m dask_kubernetes.operator.controller -m tests.dask_operator_backports \
        --all-namespaces --standalone --liveness=http://127.0.0.1:<port>/healthz

(:mod:`tests.dask_operator_backports`: an upstream fix the released operator lacks.)

with ``KUBECONFIG`` set to the admin kubeconfig of the ``kube_api`` fixture. ``--standalone``
turns kopf's peering off (peering needs kopf's own ``KopfPeering`` CRDs; without the flag kopf
looks for them and falls back to standalone with a warning). The CRDs come from the Helm chart
shipped inside the installed package
(``dask_kubernetes/operator/deployment/helm/dask-kubernetes-operator/crds/``).

Usage::

    from tests.dask_operator import DaskOperator, dask_operator  # noqa: F401
    from tests.kube import kube_api  # noqa: F401

    async def test_x(dask_operator: DaskOperator) -> None:
        await dask_operator.create_cluster(namespace, "c1", n_workers=1)
        objects = await dask_operator.wait_for_objects(namespace, "c1")
        pod = await dask_operator.run_pod(namespace, objects.scheduler_deployment.metadata.name)
        assert dask_operator.problems() == []

Nothing runs pods here. kube-controller-manager turns each Deployment into a ReplicaSet and a
Pending pod; there is no kube-scheduler and no kubelet. :meth:`DaskOperator.run_pod` plays both:
it binds the pod to the virtual node (``pods/binding``, which also sets ``PodScheduled``) and
writes the status InterLink's virtual kubelet writes: ``Running``, a pod IP, and the ``Ready``
condition *only* (no ``ContainersReady``: that is exactly why a stock ``KubeCluster`` hangs).

Timings measured on the 2-core test machine, loaded (kube-apiserver 1.20.2, dask-kubernetes
2026.3.0, kopf 1.45): installing the CRDs until Established takes ~1-5 s; the operator answers
its liveness endpoint 1.4-4.5 s after spawn (mostly imports) and has fully handled a first probe
DaskCluster (its worker group included) 2.5-7 s after spawn. From creating a DaskCluster to the
scheduler Deployment, Service, default DaskWorkerGroup and worker Deployment all existing:
0.2-2 s; a scale-up adds a worker Deployment in 0.1-0.4 s. SIGTERM stops the operator in <1 s.

Deletion is the garbage collector's job (the operator only owns the children), and
kube-controller-manager 1.20's collector discovers new resource kinds every 30 s (hard-coded): a
DaskCluster deleted in the first ~30 s after the CRDs were installed leaves its children for up
to ~30 s (20-29 s measured); later, they are gone in ~1-2 s. Hence ``GC_TIMEOUT``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube import (  # noqa: F401  (kube_api: the fixture ours depends on)
    KubeAPIServer,
    KubeStartError,
    _poll,
    _Process,
    free_port,
    kube_api,
)

DASK_GROUP = "kubernetes.dask.org"
DASK_VERSION = "v1"
#: The kinds the chart's crds/ folder defines (checked when installing).
DASK_CRDS = ("daskclusters", "daskworkergroups", "daskjobs", "daskautoscalers")

#: The InterLink virtual node, as InterLink's virtual kubelet registers it (name configurable in
#: a real install; the label/taint keys are InterLink's).
VIRTUAL_NODE = "interlink-virtual-node"
VIRTUAL_NODE_LABELS: Mapping[str, str] = {
    "kubernetes.io/hostname": VIRTUAL_NODE,
    "kubernetes.io/os": "linux",
    "kubernetes.io/role": "agent",
    "type": "virtual-kubelet",
    "virtual-node.interlink/type": "virtual-kubelet",
}
VIRTUAL_NODE_TAINT: Mapping[str, str] = {
    "key": "virtual-node.interlink/no-schedule",
    "value": "true",
    "effect": "NoSchedule",
}
#: What a DaskCluster's scheduler needs to land on the virtual node.
VIRTUAL_NODE_SELECTOR: Mapping[str, str] = {"kubernetes.io/hostname": VIRTUAL_NODE}
VIRTUAL_NODE_TOLERATIONS: Sequence[Mapping[str, str]] = (
    {"key": VIRTUAL_NODE_TAINT["key"], "operator": "Exists", "effect": "NoSchedule"},
)

#: The checkout: the operator process imports :mod:`tests.dask_operator_backports` from it.
REPO = Path(__file__).resolve().parent.parent
#: Generous: a loaded 2-core machine runs the apiserver, etcd, the controller-manager and kopf.
READY_TIMEOUT = 90.0
OBJECTS_TIMEOUT = 60.0
#: kube-controller-manager 1.20's garbage collector discovers new resource kinds every 30 s: until
#: it has seen the Dask CRDs, a deleted DaskCluster's children linger up to ~30 s.
GC_TIMEOUT = 120.0
STOP_GRACE = 10.0

#: What kopf logs when a handler, a timer or an API call fails (and is retried), plus any
#: traceback. A healthy run logs none of these.
PROBLEM_MARKERS = re.compile(
    r"failed temporarily|failed permanently|failed with an exception|has failed"
    r"|Request attempt .* failed|unrecoverable error|Traceback|\[(ERROR|CRITICAL)\s*\]"
)

KOPF_LAST_HANDLED = "kopf.zalando.org/last-handled-configuration"

_pod_ips = (f"10.244.{i // 250}.{i % 250 + 2}" for i in itertools.count())


def chart_crd_dir() -> Path:
    """The Helm chart's ``crds/`` folder inside the installed dask-kubernetes package."""
    import dask_kubernetes

    path = (
        Path(dask_kubernetes.__file__).parent
        / "operator"
        / "deployment"
        / "helm"
        / "dask-kubernetes-operator"
        / "crds"
    )
    if not path.is_dir():
        raise FileNotFoundError(f"no CRD folder at {path}")
    return path


def install_crds(kube: KubeAPIServer, *, timeout: float = READY_TIMEOUT) -> list[str]:
    """Create (or replace) every CRD of the chart and wait until each is Established.

    Idempotent: a CRD that exists is replaced with the chart's version. Returns the CRD names.
    """
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    names: list[str] = []
    for path in sorted(chart_crd_dir().glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            name = crd["metadata"]["name"]
            status, body = kube.request("POST", base, crd)
            if status == 409:
                _, current = kube.request("GET", f"{base}/{name}")
                crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                status, body = kube.request("PUT", f"{base}/{name}", crd)
            if status not in (200, 201):
                raise KubeStartError(f"installing CRD {name} from {path.name}: {status} {body}")
            names.append(name)
    missing = {f"{plural}.{DASK_GROUP}" for plural in DASK_CRDS} - set(names)
    if missing:
        raise KubeStartError(f"the chart has no CRD for {sorted(missing)}")

    def established() -> bool:
        for name in names:
            status, body = kube.request("GET", f"{base}/{name}")
            conditions = (
                # A CRD just created may carry "conditions": null until it is processed.
                ((body or {}).get("status") or {}).get("conditions") or [] if status == 200 else []
            )
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        return True

    _poll("Dask CRDs established", established, time.monotonic() + timeout, [], Path("/dev/null"))
    return names


def ensure_virtual_node(kube: KubeAPIServer) -> None:
    """Create the Node object of the InterLink virtual node (idempotent).

    Nothing needs it to bind a pod, but the reconciler may check the node's labels, and a
    cluster's nodes list then looks like a real InterLink install. kube-controller-manager runs
    without the node lifecycle controller (see tests.kube), so the node is never marked
    unreachable or tainted for lack of a kubelet heartbeat.
    """
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": VIRTUAL_NODE, "labels": dict(VIRTUAL_NODE_LABELS)},
        "spec": {"taints": [dict(VIRTUAL_NODE_TAINT)]},
    }
    status, body = kube.request("POST", "/api/v1/nodes", node)
    if status not in (201, 409):
        raise KubeStartError(f"creating node {VIRTUAL_NODE}: {status} {body}")
    # The TaintNodesByCondition admission plugin gives every new Node a
    # node.kubernetes.io/not-ready:NoSchedule taint, which the node lifecycle controller (off
    # here) removes once the kubelet reports Ready. Do both, as the virtual kubelet would.
    path = f"/api/v1/nodes/{VIRTUAL_NODE}"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "KubeletReady",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }

    def make_ready(obj: dict[str, Any]) -> None:
        obj["status"]["conditions"] = [ready]

    def keep_interlink_taint(obj: dict[str, Any]) -> None:
        obj["spec"]["taints"] = [dict(VIRTUAL_NODE_TAINT)]

    _update(kube, path + "/status", make_ready)
    _update(kube, path, keep_interlink_taint)


def _update(kube: KubeAPIServer, path: str, mutate: Callable[[dict[str, Any]], None]) -> None:
    """GET, change, PUT (``KubeAPIServer.request`` sends JSON, which PATCH does not take)."""
    for _ in range(5):
        status, obj = kube.request("GET", path)
        if status != 200:
            raise KubeStartError(f"GET {path}: {status} {obj}")
        mutate(obj)
        status, body = kube.request("PUT", path, obj)
        if status == 200:
            return
        if status != 409:
            raise KubeStartError(f"PUT {path}: {status} {body}")
    raise KubeStartError(f"PUT {path}: conflicts kept coming")


def cluster_spec(
    name: str,
    *,
    image: str = "ghcr.io/dask/dask:latest",
    n_workers: int = 1,
    scheduler_node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    worker_node_selector: Mapping[str, str] | None = None,
    worker_tolerations: Sequence[Mapping[str, Any]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A DaskCluster as ``KubeCluster(...)`` makes it (dask-kubernetes' own ``make_cluster_spec``),
    with the scheduler (and optionally the workers) placed by node selector and tolerations."""
    from dask_kubernetes.operator import make_cluster_spec

    spec: dict[str, Any] = make_cluster_spec(name=name, image=image, n_workers=n_workers)
    if labels:
        spec["metadata"]["labels"] = dict(labels)
    for part, selector, tols in (
        ("scheduler", scheduler_node_selector, tolerations),
        ("worker", worker_node_selector, worker_tolerations),
    ):
        pod_spec = spec["spec"][part]["spec"]
        if selector:
            pod_spec["nodeSelector"] = dict(selector)
        if tols:
            pod_spec["tolerations"] = [dict(t) for t in tols]
    return spec


@dataclass
class DaskClusterObjects:
    """What the operator made for one DaskCluster (as read once all of it existed)."""

    cluster: dict[str, Any]
    scheduler_deployment: client.V1Deployment
    service: client.V1Service
    worker_group: dict[str, Any]
    #: Worker Deployments of the default worker group, oldest first.
    worker_deployments: list[client.V1Deployment]


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], seconds: float, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``seconds``."""
    interval = 0.05
    with anyio.move_on_after(seconds):
        while True:
            result = await predicate()
            if result:
                return result
            await anyio.sleep(interval)
            interval = min(interval * 1.5, 0.5)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


async def _read_or_none(read: Awaitable[Any]) -> Any:
    try:
        return await read
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


class DaskOperator:
    """The operator subprocess, and async helpers to drive Dask clusters through the API."""

    def __init__(
        self, kube: KubeAPIServer, *, log_path: Path | None = None, hosts_file: Path | None = None
    ) -> None:
        self.kube = kube
        self.log_path = log_path or kube.directory / "dask-operator.log"
        #: If set, the operator runs in a private mount namespace (needs root) whose /etc/hosts is
        #: this file, bind-mounted: in-place writes to it show at once. Stands in for cluster DNS.
        self.hosts_file = hosts_file
        self.liveness_port = 0
        self.version = importlib.metadata.version("dask-kubernetes")
        self._process: _Process | None = None
        #: Seconds to install the CRDs (until Established).
        self.crds_seconds = 0.0
        #: Seconds from spawn to a live /healthz, and to the first DaskCluster handled.
        self.live_seconds = 0.0
        self.ready_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, timeout: float = READY_TIMEOUT) -> None:
        """Install CRDs and the virtual node, spawn the operator, wait until it handles clusters."""
        crds_started = time.monotonic()
        install_crds(self.kube, timeout=timeout)
        self.crds_seconds = time.monotonic() - crds_started
        ensure_virtual_node(self.kube)
        self.liveness_port = free_port()
        # ``_Process`` spawns with this process's environment: env(1) adds KUBECONFIG and drops
        # the in-cluster variables (kopf and kr8s would prefer them), then execs Python, so the
        # PID that gets SIGTERM is the operator's.
        argv = [
            "env",
            "-u",
            "KUBERNETES_SERVICE_HOST",
            "-u",
            "KUBERNETES_SERVICE_PORT",
            f"KUBECONFIG={self.kube.kubeconfig}",
            # Lines reach the log file at once: problems() must see the latest ones.
            "PYTHONUNBUFFERED=1",
            f"PYTHONPATH={REPO}",
            sys.executable,
            "-m",
            "kopf",
            "run",
            "-m",
            "dask_kubernetes.operator.controller",
            # The released operator plus an upstream fix it lacks (see the module).
            "-m",
            "tests.dask_operator_backports",
            "--all-namespaces",
            "--standalone",
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]
        if self.hosts_file is not None:
            # unshare and sh each exec the next: the PID that gets SIGTERM is the operator's.
            mount = 'mount --bind "$0" /etc/hosts && exec "$@"'
            unshare = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount]
            argv = [*unshare, str(self.hosts_file), *argv]
        self._process = _Process("dask-operator", argv, self.log_path, grace=STOP_GRACE)
        started = time.monotonic()
        self._process.start()
        try:
            deadline = started + timeout
            _poll("dask operator liveness", self._live, deadline, [self._process], self.log_path)
            self.live_seconds = time.monotonic() - started
            self._probe_cluster(deadline)
            self.ready_seconds = time.monotonic() - started
        except BaseException:
            self.stop()
            raise

    def _live(self) -> bool:
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, ValueError):
            return False

    def _probe_cluster(self, deadline: float) -> None:
        """Create a DaskCluster and wait for its scheduler Deployment: the watches are live."""
        namespace = "dask-operator-probe"
        name = f"probe-{uuid.uuid4().hex[:6]}"
        status, body = self.kube.request(
            "POST", "/api/v1/namespaces", {"metadata": {"name": namespace}}
        )
        if status not in (201, 409):
            raise KubeStartError(f"creating namespace {namespace}: {status} {body}")
        base = f"/apis/{DASK_GROUP}/{DASK_VERSION}/namespaces/{namespace}/daskclusters"
        status, body = self.kube.request("POST", base, cluster_spec(name, n_workers=0))
        if status != 201:
            raise KubeStartError(f"creating probe DaskCluster: {status} {body}")
        group_path = (
            f"/apis/{DASK_GROUP}/{DASK_VERSION}/namespaces/{namespace}"
            f"/daskworkergroups/{name}-default"
        )
        deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}-scheduler"

        def handled(path: str) -> bool:
            # kopf writes this annotation once every creation handler of the object succeeded.
            status, obj = self.kube.request("GET", path)
            annotations = (obj or {}).get("metadata", {}).get("annotations") or {}
            return status == 200 and KOPF_LAST_HANDLED in annotations

        assert self._process is not None
        _poll(
            "dask operator to handle a probe DaskCluster",
            lambda: (
                handled(f"{base}/{name}")
                and handled(group_path)
                and self.kube.request("GET", deployment_path)[0] == 200
            ),
            deadline,
            [self._process],
            self.log_path,
        )
        # Deleted only once fully handled: deleting it mid-way makes kopf log retries. The
        # garbage collector removes the children; nothing waits for that.
        self.kube.request("DELETE", f"{base}/{name}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_GRACE`` seconds."""
        if self._process is not None:
            self._process.stop()
            self._process = None

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    def check_alive(self) -> None:
        if self._process is None:
            raise RuntimeError("dask operator not started")
        self._process.check_alive()

    # -- log ----------------------------------------------------------------------------------

    def log(self) -> str:
        """The operator's whole log so far (kopf writes it to stdout/stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Where the log ends now; pass it to :meth:`problems` to look at later lines only."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def problems(self, since: int = 0) -> list[str]:
        """Log lines that show a failing or retried handler/timer/API call, or a traceback."""
        text = self.log()[since:] if since else self.log()
        return [line for line in text.splitlines() if PROBLEM_MARKERS.search(line)]

    # -- API helpers --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def api(self) -> AsyncIterator[client.ApiClient]:
        """An ApiClient for the admin kubeconfig (not the process-global configuration)."""
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.kube.kubeconfig), client_configuration=configuration
        )
        async with client.ApiClient(configuration) as api_client:
            yield api_client

    async def create_cluster(
        self,
        namespace: str,
        name: str,
        *,
        scheduler_node_selector: Mapping[str, str] | None = VIRTUAL_NODE_SELECTOR,
        tolerations: Sequence[Mapping[str, Any]] | None = VIRTUAL_NODE_TOLERATIONS,
        n_workers: int = 1,
        image: str = "ghcr.io/dask/dask:latest",
        worker_node_selector: Mapping[str, str] | None = None,
        worker_tolerations: Sequence[Mapping[str, Any]] | None = None,
        labels: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create a DaskCluster (``body`` as given, else :func:`cluster_spec`); return it."""
        if body is None:
            body = cluster_spec(
                name,
                image=image,
                n_workers=n_workers,
                scheduler_node_selector=scheduler_node_selector,
                tolerations=tolerations,
                worker_node_selector=worker_node_selector,
                worker_tolerations=worker_tolerations,
                labels=labels,
            )
        async with self.api() as api:
            created: dict[str, Any] = await client.CustomObjectsApi(
                api
            ).create_namespaced_custom_object(
                DASK_GROUP,
                DASK_VERSION,
                namespace,
                "daskclusters",
                dict(body),  # type: ignore[arg-type]
            )
        return created

    async def scale(
        self, namespace: str, name: str, n: int, *, worker_group: str | None = None
    ) -> None:
        """Set a cluster's worker count (as ``KubeCluster.scale`` does), or one worker group's."""
        plural, target, patch = (
            ("daskclusters", name, {"spec": {"worker": {"replicas": n}}})
            if worker_group is None
            else ("daskworkergroups", worker_group, {"spec": {"worker": {"replicas": n}}})
        )
        async with self.api() as api:
            await client.CustomObjectsApi(api).patch_namespaced_custom_object(  # type: ignore[call-arg]
                DASK_GROUP,
                DASK_VERSION,
                namespace,
                plural,
                target,
                patch,
                _content_type="application/merge-patch+json",
            )

    async def delete_cluster(self, namespace: str, name: str) -> None:
        async with self.api() as api:
            await client.CustomObjectsApi(api).delete_namespaced_custom_object(
                DASK_GROUP, DASK_VERSION, namespace, "daskclusters", name
            )

    async def read_objects(
        self, namespace: str, name: str
    ) -> tuple[
        dict[str, Any] | None,
        client.V1Deployment | None,
        client.V1Service | None,
        dict[str, Any] | None,
        list[client.V1Deployment],
    ]:
        """The cluster and its children as they are now (None/[] for what does not exist)."""
        async with self.api() as api:
            custom = client.CustomObjectsApi(api)
            apps = client.AppsV1Api(api)
            core = client.CoreV1Api(api)
            cluster = await _read_or_none(
                custom.get_namespaced_custom_object(
                    DASK_GROUP, DASK_VERSION, namespace, "daskclusters", name
                )
            )
            deployment = await _read_or_none(
                apps.read_namespaced_deployment(f"{name}-scheduler", namespace)
            )
            service = await _read_or_none(
                core.read_namespaced_service(f"{name}-scheduler", namespace)
            )
            group = await _read_or_none(
                custom.get_namespaced_custom_object(
                    DASK_GROUP, DASK_VERSION, namespace, "daskworkergroups", f"{name}-default"
                )
            )
            workers = await apps.list_namespaced_deployment(
                namespace,
                label_selector=(
                    f"dask.org/cluster-name={name},dask.org/component=worker,"
                    f"dask.org/workergroup-name={name}-default"
                ),
            )
        worker_deployments = sorted(
            workers.items, key=lambda d: (d.metadata.creation_timestamp, d.metadata.name)
        )
        return cluster, deployment, service, group, worker_deployments

    async def wait_for_objects(
        self,
        namespace: str,
        name: str,
        *,
        n_workers: int | None = None,
        timeout: float = OBJECTS_TIMEOUT,
    ) -> DaskClusterObjects:
        """Wait until the operator made the scheduler Deployment and Service, the default
        worker group and ``n_workers`` worker Deployments (default: the group's replicas)."""

        async def complete() -> DaskClusterObjects | None:
            self.check_alive()
            cluster, deployment, service, group, workers = await self.read_objects(namespace, name)
            if cluster is None or deployment is None or service is None or group is None:
                return None
            wanted = n_workers if n_workers is not None else group["spec"]["worker"]["replicas"]
            if len(workers) != wanted:
                return None
            return DaskClusterObjects(cluster, deployment, service, group, workers)

        result: DaskClusterObjects = await wait_for(
            complete, timeout, f"the Dask operator to create the objects of {namespace}/{name}"
        )
        return result

    async def wait_for_cluster_gone(
        self, namespace: str, name: str, *, timeout: float = GC_TIMEOUT
    ) -> None:
        """Wait until the DaskCluster and everything it owned (pods included) are deleted.

        Plays the kubelet's part in pod deletion meanwhile (:meth:`finish_pod_deletions`): the
        garbage collector deletes a bound pod gracefully, and only a kubelet ends that.
        """
        left: list[str] = []

        async def gone() -> bool:
            cluster, deployment, service, group, workers = await self.read_objects(namespace, name)
            pods = await self.finish_pod_deletions(
                namespace, label_selector=f"dask.org/cluster-name={name}"
            )
            left[:] = [
                what
                for what, obj in (
                    ("DaskCluster", cluster),
                    ("scheduler Deployment", deployment),
                    ("Service", service),
                    ("DaskWorkerGroup", group),
                )
                if obj is not None
            ]
            left.extend(f"Deployment {d.metadata.name}" for d in workers)
            left.extend(f"Pod {p.metadata.name}" for p in pods)
            return not left

        try:
            await wait_for(gone, timeout, f"{namespace}/{name} and its children to be deleted")
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}; still there: {', '.join(left)}", pytrace=False)

    async def finish_pod_deletions(
        self, namespace: str, *, label_selector: str = ""
    ) -> list[client.V1Pod]:
        """Do what a (virtual) kubelet does for pods being deleted gracefully: confirm it.

        A pod bound to a node is not removed by a delete: it gets a deletionTimestamp and stays
        until the kubelet has stopped its containers and deletes it with grace period 0. Returns
        the pods still there (matching ``label_selector``) before those final deletes.
        """
        async with self.api() as api:
            core = client.CoreV1Api(api)
            pods = await core.list_namespaced_pod(namespace, label_selector=label_selector)
            for pod in pods.items:
                if pod.metadata.deletion_timestamp is not None and pod.spec.node_name:
                    await _read_or_none(
                        core.delete_namespaced_pod(
                            pod.metadata.name,
                            namespace,
                            body=client.V1DeleteOptions(
                                grace_period_seconds=0,
                                preconditions=client.V1Preconditions(uid=pod.metadata.uid),
                            ),
                        )
                    )
        return list(pods.items)

    # -- the virtual kubelet ------------------------------------------------------------------

    async def deployment_pods(self, namespace: str, deployment: str) -> list[client.V1Pod]:
        """Pods of a Deployment (through its ReplicaSets' owner references), oldest first."""
        async with self.api() as api:
            apps = client.AppsV1Api(api)
            core = client.CoreV1Api(api)
            dep = await apps.read_namespaced_deployment(deployment, namespace)
            selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
            replica_sets = await apps.list_namespaced_replica_set(
                namespace, label_selector=selector
            )
            owned_rs = {
                rs.metadata.uid
                for rs in replica_sets.items
                if any(ref.uid == dep.metadata.uid for ref in rs.metadata.owner_references or [])
            }
            pods = await core.list_namespaced_pod(namespace, label_selector=selector)
        owned = [
            pod
            for pod in pods.items
            if pod.metadata.deletion_timestamp is None
            and any(ref.uid in owned_rs for ref in pod.metadata.owner_references or [])
        ]
        return sorted(owned, key=lambda p: (p.metadata.creation_timestamp, p.metadata.name))

    async def run_pod(
        self,
        namespace: str,
        deployment: str,
        *,
        node: str = VIRTUAL_NODE,
        pod_ip: str | None = None,
        conditions: Sequence[str] = ("Ready",),
        timeout: float = OBJECTS_TIMEOUT,
    ) -> client.V1Pod:
        """Do what kube-scheduler and InterLink's virtual kubelet do for a Deployment's pod.

        Waits for the pod kube-controller-manager creates, binds it to ``node`` (the pods/binding
        subresource, as kube-scheduler does; the API server then sets ``PodScheduled``), and
        writes its status: ``Running``, ``pod_ip`` (default: a fresh 10.244.x.y; Endpoints
        reject loopback addresses) and the given conditions True -- by default ``Ready`` only,
        like InterLink; pass ``("Ready", "ContainersReady")`` for a kubelet's view. Returns
        the pod as read afterwards.
        """

        async def first_pod() -> client.V1Pod | None:
            pods = await self.deployment_pods(namespace, deployment)
            return pods[0] if pods else None

        pod: client.V1Pod = await wait_for(
            first_pod, timeout, f"a pod of Deployment {namespace}/{deployment}"
        )
        name = pod.metadata.name
        ip = pod_ip or next(_pod_ips)
        async with self.api() as api:
            core = client.CoreV1Api(api)
            if not pod.spec.node_name:
                await self._check_placement(core, pod, node)
                binding = client.V1Binding(
                    metadata=client.V1ObjectMeta(name=name),
                    target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
                )
                # The response is a Status, which the generated client cannot parse as a
                # V1Binding: take it raw.
                await core.create_namespaced_pod_binding(
                    name, namespace, binding, _preload_content=False
                )
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            status = {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [
                    {"type": c, "status": "True", "lastTransitionTime": now} for c in conditions
                ],
            }
            await core.patch_namespaced_pod_status(name, namespace, {"status": status})
            result: client.V1Pod = await core.read_namespaced_pod(name, namespace)
        return result

    async def _check_placement(self, core: client.CoreV1Api, pod: client.V1Pod, node: str) -> None:
        """Refuse a binding kube-scheduler would refuse: nodeSelector or an untolerated taint."""
        node_obj = await _read_or_none(core.read_node(node))
        if node_obj is None:
            return
        labels = node_obj.metadata.labels or {}
        selector = pod.spec.node_selector or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            raise ValueError(f"pod {pod.metadata.name} nodeSelector {selector} excludes {node}")
        for taint in node_obj.spec.taints or []:
            if taint.effect not in ("NoSchedule", "NoExecute"):
                continue
            if not any(
                (t.key == taint.key or (t.key is None and t.operator == "Exists"))
                and (t.operator == "Exists" or t.value == taint.value)
                and (t.effect in (None, "", taint.effect))
                for t in pod.spec.tolerations or []
            ):
                raise ValueError(f"pod {pod.metadata.name} does not tolerate {taint.key} on {node}")


@pytest.fixture(scope="session")
def dask_operator(kube_api: KubeAPIServer) -> Iterator[DaskOperator]:  # noqa: F811
    """The real Dask operator watching all namespaces of the session's control plane.

    Also installs the Dask CRDs and the ``interlink-virtual-node`` Node. Stopped (SIGTERM, then
    SIGKILL) at the end of the session; its log stays readable through ``log()`` until then.
    """
    operator = DaskOperator(kube_api)
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
