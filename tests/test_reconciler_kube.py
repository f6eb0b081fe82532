"""The reconciler against a real kube-apiserver (tests/kube.py), without the Dask operator.

Objects are created the way the dask-kubernetes operator (2026.3.0) and the forwarder would
create them; the real garbage collector, endpoint, EndpointSlice, Deployment and ReplicaSet
controllers run. The scheduler pod is made by kube-controller-manager from the scheduler
Deployment (owned by the DaskCluster), so it has the owner chain the reconciler checks
(``require_owner_chain``); pods made by hand stand for forged claims. Nothing runs pods: every
pod bound to the virtual node gets its status from ``tests/fakes/virtual_kubelet.py``, which
overwrites it the way InterLink's virtual kubelet does (Running, podIP 127.0.0.1, conditions
replaced by ``[Ready]`` on every loop) for the whole test.

Layout: as an operator installs it, the forwarder pod and its Tunnels live in a namespace of
their own (the reconciler's ``namespace``), the DaskClusters in a user namespace; users are told
apart there by the KubeSpawner label ``hub.jupyter.org/username``. The namespace-pattern rule
(``jupyter-{user}``) and the hub's-namespace layout have tests of their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import dask_kubernetes
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import generate_latest

from daemons.reconciler import route
from daemons.reconciler.controller import Reconciler
from daemons.reconciler.kube import call_json, get_or_none
from daemons.reconciler.settings import ReconcilerSettings
from tests.fakes.schedd import FakeSchedd
from tests.fakes.virtual_kubelet import FakeVirtualKubelet, running_virtual_kubelet
from tests.kube import KubeAPIServer, kube_api  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TUNNEL_CRD = REPO / "configs" / "kubernetes" / "crd-tunnels.yaml"
DASK_CRDS = (
    Path(dask_kubernetes.__file__).parent
    / "operator"
    / "deployment"
    / "helm"
    / "dask-kubernetes-operator"
    / "crds"
)
VIRTUAL_NODE = "interlink-vk"
USER_LABEL = "hub.jupyter.org/username"
FORWARDER_IP = "10.244.1.10"
#: The fake virtual kubelet's status loop period in these tests (it overwrites every pod's
#: conditions this often, so the reconciler's re-assertion is exercised all the time).
VK_INTERVAL = 1.0
G, V = "jobtunnel.io", "v1alpha1"
DG, DV = "kubernetes.dask.org", "v1"


# -- helpers --------------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], seconds: float = 30, what: str = "condition"
) -> Any:
    """Poll until ``predicate`` returns something truthy (returned); fail after ``seconds``."""
    with anyio.move_on_after(seconds):
        while True:
            result = await predicate()
            if result:
                return result
            await anyio.sleep(0.1)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


def apply_crds(kube: KubeAPIServer) -> None:
    """Create the Tunnel and Dask CRDs (once per API server) and wait until established."""
    docs = [yaml.safe_load(TUNNEL_CRD.read_text())]
    docs += [yaml.safe_load(p.read_text()) for p in sorted(DASK_CRDS.glob("*.yaml"))]
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for doc in docs:
        status, body = kube.request("POST", base, doc)
        if status not in (201, 409):
            raise RuntimeError(f"CRD {doc['metadata']['name']}: {status} {body}")
    deadline = time.monotonic() + 30
    for doc in docs:
        while True:
            status, body = kube.request("GET", f"{base}/{doc['metadata']['name']}")
            status_ = (body or {}).get("status") or {} if status == 200 else {}
            conds = status_.get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {doc['metadata']['name']} not established")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def crds(kube_api: KubeAPIServer) -> KubeAPIServer:  # noqa: F811
    apply_crds(kube_api)
    return kube_api


async def admin_client(kube: KubeAPIServer) -> client.ApiClient:
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kube.kubeconfig), client_configuration=configuration
    )
    return client.ApiClient(configuration)


@pytest.fixture
async def api(crds: KubeAPIServer) -> AsyncIterator[client.ApiClient]:
    async with await admin_client(crds) as api_client:
        yield api_client


@pytest.fixture
async def namespaces(api: client.ApiClient) -> AsyncIterator[tuple[str, str]]:
    """(user namespace, forwarder namespace), both fresh."""
    base = f"jt-{uuid.uuid4().hex[:8]}"
    names = (f"{base}-users", f"{base}-jobtunnel")
    core = client.CoreV1Api(api)
    for name in names:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield names
    for name in names:
        await core.delete_namespace(name)


def settings_for(
    namespace: str, user_namespace: str | None = None, **overrides: Any
) -> ReconcilerSettings:
    """Tunnels in ``namespace``; DaskClusters in ``user_namespace`` (default: the same one)."""
    values: dict[str, Any] = {
        "namespace": namespace,
        "virtual_node": VIRTUAL_NODE,
        # Everyone in one user namespace: the label tells users apart.
        "user_namespace": user_namespace or namespace,
        "user_label": USER_LABEL,
        "resync_interval": 5.0,
        "watch_timeout": 20.0,
        "lease_duration": 3.0,
        "lease_renew_deadline": 2.0,
        "lease_retry_period": 0.3,
        "job_poll_interval": 0.5,
        "job_query_timeout": 5.0,
        "request_timeout": 10.0,
    }
    values.update(overrides)
    return ReconcilerSettings(**values)


@contextlib.asynccontextmanager
async def running(
    settings: ReconcilerSettings, kube: KubeAPIServer, **kwargs: Any
) -> AsyncIterator[Reconciler]:
    """A Reconciler in this task's task group, with its own ApiClient; stopped on exit."""
    async with await admin_client(kube) as api_client, anyio.create_task_group() as tg:
        reconciler = Reconciler(settings, api=api_client, **kwargs)
        with anyio.fail_after(30):
            await tg.start(reconciler.run)
        try:
            yield reconciler
        finally:
            tg.cancel_scope.cancel()


class World:
    """Creates objects as the Dask operator, InterLink and the forwarder would."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        forwarder_namespace: str | None = None,
        vk: FakeVirtualKubelet | None = None,
    ) -> None:
        self.api = api
        #: The DaskClusters' namespace, and the forwarder's (its pods and Tunnels).
        self.ns = namespace
        self.fwd_ns = forwarder_namespace or namespace
        #: The fake virtual kubelet writing the status of pods on the virtual node, if any.
        self.vk = vk
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # Dask operator ----------------------------------------------------------------------

    async def dask_cluster(
        self, name: str, user: str, *, node: str = VIRTUAL_NODE, run: bool = True
    ) -> dict[str, Any]:
        """DaskCluster + scheduler Service + scheduler Deployment (and, by kube-controller-manager,
        its ReplicaSet and pod: the owner chain the reconciler checks) + default worker group +
        1 worker Deployment. ``run``: also "run" the scheduler pod on ``node``
        (:meth:`run_scheduler`)."""
        container = {
            "name": "worker",
            "image": "ghcr.io/dask/dask:latest",
            "args": ["dask", "worker"],
        }
        cluster = await call_json(
            self.custom.create_namespaced_custom_object,
            DG,
            DV,
            self.ns,
            "daskclusters",
            {
                "apiVersion": f"{DG}/{DV}",
                "kind": "DaskCluster",
                "metadata": {"name": name, "labels": {USER_LABEL: user}},
                "spec": {
                    "worker": {"replicas": 1, "spec": {"containers": [container]}},
                    "scheduler": {
                        "spec": {
                            "containers": [{"name": "scheduler", "image": "ghcr.io/dask/dask"}]
                        },
                        "service": {
                            "type": "ClusterIP",
                            "selector": {
                                "dask.org/cluster-name": name,
                                "dask.org/component": "scheduler",
                            },
                            "ports": [
                                {
                                    "name": "tcp-comm",
                                    "protocol": "TCP",
                                    "port": 8786,
                                    "targetPort": "tcp-comm",
                                },
                                {
                                    "name": "http-dashboard",
                                    "protocol": "TCP",
                                    "port": 8787,
                                    "targetPort": "http-dashboard",
                                },
                            ],
                        },
                    },
                },
            },
        )
        owner = {
            "apiVersion": f"{DG}/{DV}",
            "kind": "DaskCluster",
            "name": name,
            "uid": cluster["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        labels = {
            "dask.org/cluster-name": name,
            "dask.org/component": "scheduler",
            USER_LABEL: user,
        }
        await call_json(
            self.core.create_namespaced_service,
            self.ns,
            {
                "metadata": {
                    "name": f"{name}-scheduler",
                    "labels": labels,
                    "ownerReferences": [owner],
                },
                "spec": cluster["spec"]["scheduler"]["service"],
            },
        )
        await self.scheduler_deployment(name, user, owner)
        await call_json(
            self.custom.create_namespaced_custom_object,
            DG,
            DV,
            self.ns,
            "daskworkergroups",
            {
                "apiVersion": f"{DG}/{DV}",
                "kind": "DaskWorkerGroup",
                "metadata": {
                    "name": f"{name}-default",
                    "labels": {"dask.org/cluster-name": name, "dask.org/component": "workergroup"},
                    "ownerReferences": [owner],
                },
                "spec": {"cluster": name, "worker": cluster["spec"]["worker"]},
            },
        )
        worker_labels = {
            "dask.org/cluster-name": name,
            "dask.org/workergroup-name": f"{name}-default",
            "dask.org/component": "worker",
        }
        worker = dict(container)
        worker["env"] = [
            {"name": "DASK_WORKER_NAME", "value": f"{name}-default-worker-0"},
            {
                "name": "DASK_SCHEDULER_ADDRESS",
                "value": f"tcp://{name}-scheduler.{self.ns}.svc.cluster.local:8786",
            },
        ]
        await call_json(
            self.apps.create_namespaced_deployment,
            self.ns,
            {
                "metadata": {
                    "name": f"{name}-default-worker-0",
                    "labels": worker_labels,
                    "ownerReferences": [owner],
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": worker_labels},
                    "template": {
                        "metadata": {"labels": worker_labels},
                        "spec": {"containers": [worker]},
                    },
                },
            },
        )
        if run:
            await self.run_scheduler(name, node=node)
        return cluster

    async def scheduler_deployment(self, cluster: str, user: str, owner: dict[str, Any]) -> None:
        """The scheduler Deployment as the operator makes it (``kopf.adopt``: controller owner
        the DaskCluster; labels of the DaskCluster plus the operator's own)."""
        labels = {
            "dask.org/cluster-name": cluster,
            "dask.org/component": "scheduler",
            "sidecar.istio.io/inject": "false",
            USER_LABEL: user,
        }
        metadata = {"name": f"{cluster}-scheduler", "labels": labels}
        await call_json(
            self.apps.create_namespaced_deployment,
            self.ns,
            {
                "metadata": {**metadata, "ownerReferences": [owner]},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": metadata,
                        "spec": {
                            "containers": [{"name": "scheduler", "image": "ghcr.io/dask/dask"}]
                        },
                    },
                },
            },
        )

    async def run_scheduler(
        self, cluster: str, *, node: str = VIRTUAL_NODE, not_uid: str | None = None
    ) -> dict[str, Any]:
        """Do what kube-scheduler does for the scheduler pod that kube-controller-manager made
        (``not_uid``: a replacement of that pod): bind it to ``node``; then wait for the status
        the (fake) virtual kubelet writes: Running and Ready, no ContainersReady. Returns the
        pod."""

        async def made() -> dict[str, Any] | None:
            pods = await call_json(
                self.core.list_namespaced_pod,
                self.ns,
                label_selector=f"dask.org/cluster-name={cluster},dask.org/component=scheduler",
            )
            for pod in pods.get("items") or []:
                meta = pod["metadata"]
                refs = meta.get("ownerReferences") or []
                if (
                    meta["uid"] != not_uid
                    and not meta.get("deletionTimestamp")
                    and any(r.get("kind") == "ReplicaSet" and r.get("controller") for r in refs)
                ):
                    return dict(pod)
            return None

        pod = await wait_for(made, 60, f"kube-controller-manager to create {cluster}'s pod")
        name = pod["metadata"]["name"]
        if not (pod.get("spec") or {}).get("nodeName"):
            await call_json(
                self.core.create_namespaced_pod_binding,
                name,
                self.ns,
                {
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                },
            )
        return await self._running(name, node)

    async def _running(self, name: str, node: str) -> dict[str, Any]:
        """The pod once its node reported it Running: the virtual kubelet's write, or (another
        node: no kubelet runs here) a kubelet's status written by the test."""
        if node != VIRTUAL_NODE or self.vk is None:
            await call_json(
                self.core.patch_namespaced_pod_status,
                name,
                self.ns,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": "10.244.9.9",
                        "podIPs": [{"ip": "10.244.9.9"}],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }
                },
                _content_type="application/strategic-merge-patch+json",
            )

        async def running() -> dict[str, Any] | None:
            pod = await call_json(self.core.read_namespaced_pod, name, self.ns)
            return dict(pod) if (pod.get("status") or {}).get("phase") == "Running" else None

        result: dict[str, Any] = await wait_for(running, 30, f"pod {name} Running")
        return result

    async def forged_pod(
        self,
        cluster: str,
        name: str,
        user: str,
        *,
        node: str = VIRTUAL_NODE,
        owners: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A pod made by hand (not by the cluster's Deployment) with a scheduler's labels."""
        labels = {
            "dask.org/cluster-name": cluster,
            "dask.org/component": "scheduler",
            USER_LABEL: user,
        }
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if owners:
            meta["ownerReferences"] = owners
        await call_json(
            self.core.create_namespaced_pod,
            self.ns,
            {
                "metadata": meta,
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "scheduler", "image": "ghcr.io/dask/dask"}],
                },
            },
        )
        return await self._running(name, node)

    # forwarder --------------------------------------------------------------------------

    async def forwarder_pod(
        self, name: str = "forwarder-0", ip: str = FORWARDER_IP
    ) -> dict[str, Any]:
        pod = await call_json(
            self.core.create_namespaced_pod,
            self.fwd_ns,
            {
                "metadata": {
                    "name": name,
                    "labels": {"jobtunnel.io/forwarder-pod": name, "app": "jobtunnel"},
                },
                "spec": {
                    "nodeName": "node-1",
                    "containers": [{"name": "forwarder", "image": "jobtunnel/forwarder"}],
                },
            },
        )
        await self.forwarder_status(name, ip=ip)
        return pod

    async def forwarder_status(
        self, name: str = "forwarder-0", *, ip: str = FORWARDER_IP, ready: bool = True
    ) -> None:
        """What the kubelet of the forwarder's (real) node reports for it."""
        status = "True" if ready else "False"
        await call_json(
            self.core.patch_namespaced_pod_status,
            name,
            self.fwd_ns,
            {
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [
                        {"type": "Ready", "status": status},
                        {"type": "ContainersReady", "status": status},
                    ],
                }
            },
            # A merge patch replaces the lists: podIPs may hold one address per family.
            _content_type="application/merge-patch+json",
        )

    async def tunnel(
        self,
        name: str,
        user: str,
        pod: dict[str, Any],
        forwarder: dict[str, Any],
        *,
        ports: tuple[int, int] = (40001, 40002),
        private_ip: str = "192.168.7.21",
        job: str | None = None,
        uid: str | None = None,
    ) -> dict[str, Any]:
        meta = pod["metadata"]
        spec: dict[str, Any] = {
            "sessionId": uuid.uuid4().hex,
            "user": user,
            "identity": f"pod:{meta['uid']}",
            "mode": "agent",
            "forwarder": {
                "podName": forwarder["metadata"]["name"],
                "podIP": (forwarder.get("status") or {}).get("podIP") or FORWARDER_IP,
            },
            "pod": {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": uid or meta["uid"],
            },
            "privateIP": private_ip,
            "services": [
                {"name": "scheduler", "port": ports[0], "remotePort": 8786},
                {"name": "dashboard", "port": ports[1], "remotePort": 8787},
            ],
            "since": "2026-01-01T00:00:00Z",
        }
        if job is not None:
            spec["job"] = {"globalJobId": job}
        return await call_json(
            self.custom.create_namespaced_custom_object,
            G,
            V,
            self.fwd_ns,
            "tunnels",
            {
                "apiVersion": f"{G}/{V}",
                "kind": "Tunnel",
                "metadata": {
                    "name": name,
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": forwarder["metadata"]["name"],
                            "uid": forwarder["metadata"]["uid"],
                        }
                    ],
                },
                "spec": spec,
            },
        )

    def settings(self, **overrides: Any) -> ReconcilerSettings:
        return settings_for(self.fwd_ns, self.ns, **overrides)

    # reads ------------------------------------------------------------------------------

    async def service(self, cluster: str) -> dict[str, Any]:
        return await call_json(self.core.read_namespaced_service, f"{cluster}-scheduler", self.ns)

    async def get_tunnel(self, name: str) -> dict[str, Any] | None:
        try:
            return await call_json(
                self.custom.get_namespaced_custom_object, G, V, self.fwd_ns, "tunnels", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def delete_tunnel(self, name: str) -> None:
        await call_json(
            self.custom.delete_namespaced_custom_object, G, V, self.fwd_ns, "tunnels", name
        )

    async def condition(self, tunnel: str, kind: str) -> dict[str, Any] | None:
        obj = await self.get_tunnel(tunnel)
        for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return dict(cond)
        return None

    async def worker_envs(self, cluster: str) -> tuple[str | None, str | None]:
        """DASK_SCHEDULER_ADDRESS in the default worker group and in the existing Deployment."""
        wg = await call_json(
            self.custom.get_namespaced_custom_object,
            DG,
            DV,
            self.ns,
            "daskworkergroups",
            f"{cluster}-default",
        )
        dep = await call_json(
            self.apps.read_namespaced_deployment, f"{cluster}-default-worker-0", self.ns
        )

        def env(containers: list[dict[str, Any]]) -> str | None:
            for item in containers[0].get("env") or []:
                if item["name"] == "DASK_SCHEDULER_ADDRESS":
                    return str(item.get("value"))
            return None

        return env(wg["spec"]["worker"]["spec"]["containers"]), env(
            dep["spec"]["template"]["spec"]["containers"]
        )

    async def pod_conditions(self, name: str) -> dict[str, str]:
        pod = await call_json(self.core.read_namespaced_pod, name, self.ns)
        return {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []}

    async def scheduler_pod_name(self, cluster: str) -> str:
        pods = await call_json(
            self.core.list_namespaced_pod,
            self.ns,
            label_selector=f"dask.org/cluster-name={cluster},dask.org/component=scheduler",
        )
        for pod in pods["items"]:  # the Deployment's pod, not a forged one
            meta = pod["metadata"]
            refs = meta.get("ownerReferences") or []
            if not meta.get("deletionTimestamp") and any(r["kind"] == "ReplicaSet" for r in refs):
                return str(meta["name"])
        raise AssertionError(f"no scheduler pod of cluster {cluster}")

    async def events_for(self, kind: str, name: str) -> list[dict[str, Any]]:
        ns = self.fwd_ns if kind == "Tunnel" else self.ns
        events = await call_json(self.core.list_namespaced_event, ns)
        return [
            e
            for e in events.get("items") or []
            if e["involvedObject"].get("kind") == kind and e["involvedObject"].get("name") == name
        ]

    async def network_policy(self, tunnel: str) -> dict[str, Any] | None:
        """The reconciler's NetworkPolicy for ``tunnel`` (in the forwarder namespace)."""
        net = client.NetworkingV1Api(self.api)
        return await get_or_none(net.read_namespaced_network_policy, tunnel, self.fwd_ns)

    async def reasons(self, kind: str, name: str) -> list[str]:
        return [e["reason"] for e in await self.events_for(kind, name)]

    async def slices(self, cluster: str) -> list[dict[str, Any]]:
        """Every EndpointSlice of the cluster's Service (ours and the controller's)."""
        listed = await call_json(
            self.custom.list_namespaced_custom_object,
            route.DISCOVERY_GROUP,
            "v1beta1",  # what the 1.20 test apiserver serves
            self.ns,
            route.SLICE_PLURAL,
            label_selector=f"{route.SERVICE_NAME_LABEL}={cluster}-scheduler",
        )
        return list(listed.get("items") or [])

    async def our_slice(self, cluster: str) -> dict[str, Any] | None:
        for item in await self.slices(cluster):
            labels = item["metadata"].get("labels") or {}
            if labels.get(route.MANAGED_BY_LABEL) == route.MANAGED_BY:
                return item
        return None

    async def endpoints(self, cluster: str) -> list[tuple[str, dict[str, int]]]:
        """What kube-proxy would route to: ready endpoints of all slices, ports by name.

        Loopback addresses are left out as :mod:`tests.fakes.kube_proxy` explains (the 1.20
        EndpointSlice controller publishes the virtual kubelet's 127.0.0.1, which current API
        servers refuse).
        """
        out = []
        for item in await self.slices(cluster):
            ports = {p.get("name") or "": p["port"] for p in item.get("ports") or []}
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    if not ipaddress.ip_address(address).is_loopback:
                        out.append((address, ports))
        return sorted(out, key=lambda e: e[0])


async def routed_to(
    world: World, cluster: str, ports: tuple[int, int] = (40001, 40002), ip: str = FORWARDER_IP
) -> bool:
    wanted = [(ip, {"tcp-comm": ports[0], "http-dashboard": ports[1]})]
    return await world.endpoints(cluster) == wanted


async def unrouted(world: World, cluster: str) -> bool:
    return await world.our_slice(cluster) is None


def original_spec(service: dict[str, Any]) -> str:
    """The Service's spec, byte for byte (as the API server serialises it)."""
    return json.dumps(service["spec"], sort_keys=True)


@pytest.fixture
async def world(api: client.ApiClient, namespaces: tuple[str, str]) -> AsyncIterator[World]:
    users, forwarder = namespaces
    async with running_virtual_kubelet(api, [users], VIRTUAL_NODE, interval=VK_INTERVAL) as vk:
        yield World(api, users, forwarder, vk)


# -- tests ----------------------------------------------------------------------------------


async def test_route_then_restore(world: World, crds: KubeAPIServer) -> None:
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("alpha", "alice")
    before = await world.service("alpha")
    pod_name = await world.scheduler_pod_name("alpha")
    pod = await call_json(world.core.read_namespaced_pod, pod_name, world.ns)
    assert (await world.pod_conditions(pod_name)).get("ContainersReady") is None

    async with running(world.settings(), crds) as reconciler:
        assert reconciler.slice_version == "v1beta1"  # discovery: all 1.20 serves
        await world.tunnel("alice-1", "alice", pod, forwarder)

        # What kube-proxy sees: one ready endpoint, the forwarder pod, the listener ports under
        # the Service's port names.
        await wait_for(lambda: routed_to(world, "alpha"), 30, "an endpoint at the forwarder pod")
        ours = await world.our_slice("alpha")
        assert ours is not None
        service = await world.service("alpha")
        meta = ours["metadata"]
        assert meta["name"] == "alpha-scheduler-jobtunnel"
        assert meta["labels"][route.SERVICE_NAME_LABEL] == "alpha-scheduler"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": "alpha-scheduler",
                "uid": service["metadata"]["uid"],
            }
        ]
        assert ours["endpoints"][0]["targetRef"]["namespace"] == world.fwd_ns
        by = json.loads(meta["annotations"]["jobtunnel.io/routed-by"])
        assert by["tunnel"] == f"{world.fwd_ns}/alice-1"
        # The operator's Service, untouched; the EndpointSlice controller's own slice is still
        # there beside ours and has nothing routable (the scheduler pod's IP is 127.0.0.1).
        assert original_spec(service) == original_spec(before)
        assert service["metadata"].get("annotations") == before["metadata"].get("annotations")
        await wait_for(lambda: _controller_slice(world, "alpha"), 30, "the controller's slice")

        async def workers_set() -> bool:
            return await world.worker_envs("alpha") == ("tcp://192.168.7.21:8786",) * 2

        await wait_for(workers_set, 30, "DASK_SCHEDULER_ADDRESS on worker group and Deployment")

        async def pod_ready() -> bool:
            conds = await world.pod_conditions(pod_name)
            return conds.get("ContainersReady") == "True" and conds.get("Ready") == "True"

        await wait_for(pod_ready, 30, "ContainersReady on the scheduler pod")

        async def conditions() -> bool:
            verified = await world.condition("alice-1", "Verified")
            routed = await world.condition("alice-1", "Routed")
            return bool(verified and routed and verified["status"] == routed["status"] == "True")

        await wait_for(conditions, 30, "Verified and Routed conditions")
        tunnel = await world.get_tunnel("alice-1")
        assert tunnel is not None
        assert tunnel["status"]["cluster"] == "alpha"
        assert tunnel["status"]["routedService"] == f"{world.ns}/alpha-scheduler"
        job = await world.condition("alice-1", "JobRunning")
        assert job is not None
        assert (job["status"], job["reason"]) == ("Unknown", "JobChecksDisabled")

        async def cluster_events() -> bool:
            reasons = await world.reasons("DaskCluster", "alpha")
            return {"Routed", "WorkersUpdated", "SchedulerReady"} <= set(reasons)

        await wait_for(cluster_events, 30, "Events on the DaskCluster")
        transition = (await world.condition("alice-1", "Routed") or {})["lastTransitionTime"]

        # The virtual kubelet keeps wiping ContainersReady; it keeps coming back.
        assert world.vk is not None
        writes = reconciler.metrics.readiness_writes.labels(ready="true")._value.get()
        await world.vk.next_loops(3)
        await wait_for(pod_ready, 30, "ContainersReady re-asserted after the overwrites")
        assert reconciler.metrics.readiness_writes.labels(ready="true")._value.get() > writes

        # No transition, no new Event and no new lastTransitionTime on resync.
        routed_events = (await world.reasons("DaskCluster", "alpha")).count("Routed")
        reconciler._enqueue_everything()
        await wait_for(lambda: _queue_empty(reconciler), 10, "the queue to drain")
        assert (await world.reasons("DaskCluster", "alpha")).count("Routed") == routed_events
        assert (await world.condition("alice-1", "Routed") or {})[
            "lastTransitionTime"
        ] == transition

        # Metrics.
        text = generate_latest(reconciler.registry).decode()
        for name in (
            "jobtunnel_reconciler_reconcile_seconds_bucket",
            "jobtunnel_reconciler_queue_depth",
            "jobtunnel_reconciler_errors_total",
            "jobtunnel_reconciler_readiness_writes_total",
            'jobtunnel_reconciler_tunnels{condition="Routed",status="True"}',
            "jobtunnel_reconciler_leader 1.0",
        ):
            assert name in text, name
        assert reconciler.ready_check() is None

        # The Tunnel goes: the slice goes, the Service is as it always was.
        await world.delete_tunnel("alice-1")
        await wait_for(lambda: unrouted(world, "alpha"), 30, "our EndpointSlice deleted")
        assert original_spec(await world.service("alpha")) == original_spec(before)
        operator_default = f"tcp://alpha-scheduler.{world.ns}.svc.cluster.local:8786"

        async def env_restored() -> bool:
            return await world.worker_envs("alpha") == (None, operator_default)

        await wait_for(env_restored, 30, "the worker env restored")
        await wait_for(
            lambda: _has_reason(world, "DaskCluster", "alpha", "Unrouted"), 30, "Unrouted Event"
        )
        # Never ready again once the tunnel is gone, however often the status is rewritten.
        await world.vk.next_loops(2)
        await _reconciled_all(reconciler)
        assert (await world.pod_conditions(pod_name)).get("ContainersReady") != "True"


async def _controller_slice(world: World, cluster: str) -> bool:
    """The EndpointSlice controller made its own slice for the Service (and left ours alone)."""
    managers = [
        (item["metadata"].get("labels") or {}).get(route.MANAGED_BY_LABEL)
        for item in await world.slices(cluster)
    ]
    return "endpointslice-controller.k8s.io" in managers and route.MANAGED_BY in managers


async def _reconciled_all(reconciler: Reconciler) -> None:
    await wait_for(lambda: _queue_empty(reconciler), 10, "the queue to drain")


async def _queue_empty(reconciler: Reconciler) -> bool:
    return len(reconciler.queue) == 0 and not reconciler.queue._processing


async def _has_reason(world: World, kind: str, name: str, reason: str) -> bool:
    return reason in await world.reasons(kind, name)


async def test_forged_claims_are_never_routed(world: World, crds: KubeAPIServer) -> None:
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("bobs", "bob")
    await world.dask_cluster("local", "mallory", node="node-1")  # not on the virtual node
    before = {c: await world.service(c) for c in ("bobs", "local")}
    bob_pod = await call_json(
        world.core.read_namespaced_pod, await world.scheduler_pod_name("bobs"), world.ns
    )
    local_pod = await call_json(
        world.core.read_namespaced_pod, await world.scheduler_pod_name("local"), world.ns
    )
    touched: list[str] = []

    async with running(world.settings(), crds):
        # Mallory claims Bob's pod; then her own pod with a wrong UID; then her pod off the node.
        await world.tunnel("mallory-1", "mallory", bob_pod, forwarder)
        await world.tunnel("bob-wrong-uid", "bob", bob_pod, forwarder, uid=str(uuid.uuid4()))
        await world.tunnel("mallory-2", "mallory", local_pod, forwarder)
        expected = {
            "mallory-1": "WrongUser",
            "bob-wrong-uid": "UIDMismatch",
            "mallory-2": "NotOnVirtualNode",
        }

        async def all_refused() -> bool:
            for cluster, original in before.items():
                if original_spec(await world.service(cluster)) != original_spec(original):
                    touched.append(cluster)
                if await world.our_slice(cluster) is not None:
                    touched.append(f"{cluster}: EndpointSlice")
            for name, reason in expected.items():
                cond = await world.condition(name, "Verified")
                if not cond or (cond["status"], cond["reason"]) != ("False", reason):
                    return False
                routed = await world.condition(name, "Routed")
                if not routed or routed["status"] != "False":
                    return False
            return True

        await wait_for(all_refused, 30, "all three claims refused")
        assert touched == [], f"a forged claim was routed: {touched}"

        async def events() -> bool:
            refused = [("Refused" in await world.reasons("Tunnel", name)) for name in expected]
            return all(refused) and "TunnelRefused" in await world.reasons("DaskCluster", "bobs")

        await wait_for(events, 30, "Refused Events on the Tunnels and the DaskCluster")
        for cluster, original in before.items():
            assert original_spec(await world.service(cluster)) == original_spec(original)
            assert await world.our_slice(cluster) is None
            assert await world.endpoints(cluster) in ([], [("10.244.9.9", {})])
        assert (await world.worker_envs("bobs"))[0] is None
        pod_name = bob_pod["metadata"]["name"]
        assert (await world.pod_conditions(pod_name)).get("ContainersReady") is None


async def test_forged_owner_chain_is_never_routed(world: World, crds: KubeAPIServer) -> None:
    """Right labels, right node, own user label: not the cluster's pod, so never routed.

    In a namespace shared by users, labels prove nothing: only the owner chain pod ->
    ReplicaSet -> Deployment <cluster>-scheduler -> DaskCluster <cluster> (UIDs checked) and the
    user named by the Deployment's pod template and the DaskCluster do.
    """
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("bobs", "bob")
    await world.dask_cluster("mine", "mallory")
    before = await world.service("bobs")
    bob_pod = await call_json(
        world.core.read_namespaced_pod, await world.scheduler_pod_name("bobs"), world.ns
    )
    mine_pod = await call_json(
        world.core.read_namespaced_pod, await world.scheduler_pod_name("mine"), world.ns
    )

    def controller(obj: dict[str, Any]) -> dict[str, Any]:
        (ref,) = [r for r in obj["metadata"]["ownerReferences"] if r.get("controller")]
        return dict(ref)

    # Bare pod; pod with a forged controller reference to Bob's ReplicaSet (the ReplicaSet
    # controller may release it, since its labels do not match: either way it is refused);
    # pod with a reference to Mallory's own ReplicaSet, i.e. another cluster's Deployment.
    bare = await world.forged_pod("bobs", "forged-bare", "mallory")
    to_bob_rs = await world.forged_pod(
        "bobs", "forged-bob-rs", "mallory", owners=[controller(bob_pod)]
    )
    to_own_rs = await world.forged_pod(
        "bobs", "forged-own-rs", "mallory", owners=[controller(mine_pod)]
    )
    expected = {
        "m-bare": (bare, {"NotOwnedByCluster"}),
        "m-bob-rs": (to_bob_rs, {"NotOwnedByCluster", "WrongUser"}),
        "m-own-rs": (to_own_rs, {"NotOwnedByCluster"}),
    }
    touched: list[str] = []
    async with running(world.settings(), crds):
        for i, (name, (pod, _)) in enumerate(expected.items()):
            await world.tunnel(
                name, "mallory", pod, forwarder, ports=(40101 + 2 * i, 40102 + 2 * i)
            )
        # Mallory's own, genuine pod is routed, by the same reconciler (the check is not
        # refusing everything).
        await world.tunnel("m-own", "mallory", mine_pod, forwarder)

        async def judged() -> bool:
            if original_spec(await world.service("bobs")) != original_spec(before):
                touched.append("bobs")
            if await world.our_slice("bobs") is not None:
                touched.append("bobs: EndpointSlice")
            for name, (_, reasons) in expected.items():
                cond = await world.condition(name, "Verified")
                if not cond or cond["status"] != "False" or cond["reason"] not in reasons:
                    return False
            return await routed_to(world, "mine")

        await wait_for(judged, 30, "the forged claims refused, the genuine one routed")
        bare_cond = await world.condition("m-bare", "Verified")
        assert bare_cond is not None
        assert "not controlled by a live ReplicaSet" in bare_cond["message"]

        async def events() -> bool:
            refused = [("Refused" in await world.reasons("Tunnel", n)) for n in expected]
            return all(refused) and "TunnelRefused" in await world.reasons("DaskCluster", "bobs")

        await wait_for(events, 30, "Refused Events on the Tunnels and Bob's DaskCluster")
        assert touched == [], f"a forged claim routed Bob's Service: {touched}"
        assert original_spec(await world.service("bobs")) == original_spec(before)
        assert (await world.worker_envs("bobs"))[0] is None
        assert (await world.pod_conditions(bob_pod["metadata"]["name"])).get(
            "ContainersReady"
        ) is None

    # The setting turns the check off (for namespaces where users cannot create pods): the
    # bare pod then passes verification, which is exactly the hole the check closes.
    await world.delete_tunnel("m-bob-rs")
    await world.delete_tunnel("m-own-rs")
    async with running(world.settings(require_owner_chain=False), crds):

        async def accepted() -> bool:
            cond = await world.condition("m-bare", "Verified")
            return bool(cond and cond["status"] == "True")

        await wait_for(accepted, 30, "the bare pod verified with require_owner_chain off")
        await wait_for(lambda: routed_to(world, "bobs", (40101, 40102)), 30, "the hole, shown")
        await world.delete_tunnel("m-bare")
        await wait_for(lambda: unrouted(world, "bobs"), 30, "Bob's Service unrouted")
        assert original_spec(await world.service("bobs")) == original_spec(before)


async def test_namespace_rule(api: client.ApiClient, crds: KubeAPIServer) -> None:
    """The default kind of rule (``<prefix>-{user}``): another user's namespace is refused, the
    owner's is routed from the forwarder's namespace (no ``ForwarderInOtherNamespace`` any
    more: the endpoint is an address, not a selected pod)."""
    prefix = f"jt-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(api)
    names = [prefix, f"{prefix}-alice"]
    for name in names:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        async with running_virtual_kubelet(api, [names[1]], VIRTUAL_NODE) as vk:
            alice = World(api, f"{prefix}-alice", prefix, vk)
            forwarder = await alice.forwarder_pod()
            await alice.dask_cluster("ac", "alice")
            before = await alice.service("ac")
            pod = await call_json(
                core.read_namespaced_pod, await alice.scheduler_pod_name("ac"), alice.ns
            )
            settings = settings_for(prefix, user_namespace=f"{prefix}-{{user}}", user_label="")
            async with running(settings, crds):
                await alice.tunnel("eve-1", "eve", pod, forwarder, ports=(40091, 40092))

                async def eve_refused() -> bool:
                    eve = await alice.condition("eve-1", "Verified")
                    return bool(eve and eve["reason"] == "WrongUser")

                await wait_for(eve_refused, 30, "eve refused")
                assert await alice.our_slice("ac") is None
                await alice.tunnel("alice-1", "alice", pod, forwarder)
                await wait_for(lambda: routed_to(alice, "ac"), 30, "alice's cluster routed")

                # The condition is written after the slice: wait for it, don't race it.
                async def routed_true() -> bool:
                    own = await alice.condition("alice-1", "Routed")
                    return bool(own and own["status"] == "True")

                await wait_for(routed_true, 30, "Routed=True on alice's Tunnel")
                assert original_spec(await alice.service("ac")) == original_spec(before)

                async def ready() -> bool:
                    conds = await alice.pod_conditions(pod["metadata"]["name"])
                    return conds.get("ContainersReady") == "True"

                await wait_for(ready, 30, "ContainersReady in alice's namespace")
                await alice.delete_tunnel("alice-1")
                await wait_for(lambda: unrouted(alice, "ac"), 30, "alice's slice deleted")
    finally:
        for name in names:
            await core.delete_namespace(name)


async def test_scheduler_pod_replaced(world: World, crds: KubeAPIServer) -> None:
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("rep", "alice")
    before = await world.service("rep")
    old_name = await world.scheduler_pod_name("rep")
    old = await call_json(world.core.read_namespaced_pod, old_name, world.ns)
    async with running(world.settings(), crds):
        await world.tunnel("alice-old", "alice", old, forwarder, ports=(40011, 40012))

        await wait_for(lambda: routed_to(world, "rep", (40011, 40012)), 30, "old session routed")

        # The job is lost; the Deployment makes a new pod (new name, new UID); its agent connects.
        await call_json(
            world.core.delete_namespaced_pod, old_name, world.ns, grace_period_seconds=0
        )
        new = await world.run_scheduler("rep", not_uid=old["metadata"]["uid"])
        new_name = new["metadata"]["name"]
        assert new_name != old_name
        await world.tunnel(
            "alice-new", "alice", new, forwarder, ports=(40021, 40022), private_ip="192.168.7.99"
        )

        await wait_for(lambda: routed_to(world, "rep", (40021, 40022)), 30, "new session routed")

        async def old_refused() -> bool:
            cond = await world.condition("alice-old", "Verified")
            return bool(cond and cond["reason"] == "PodNotFound")

        await wait_for(old_refused, 30, "the old Tunnel refused")

        async def new_ready() -> bool:
            conds = await world.pod_conditions(new_name)
            env = await world.worker_envs("rep")
            return (
                conds.get("ContainersReady") == "True" and env == ("tcp://192.168.7.99:8786",) * 2
            )

        await wait_for(new_ready, 30, "new pod ready and workers pointed at the new IP")
        ours = await world.our_slice("rep")
        assert ours is not None
        routed_by = json.loads(ours["metadata"]["annotations"]["jobtunnel.io/routed-by"])
        assert routed_by["tunnel"] == f"{world.fwd_ns}/alice-new"
        assert routed_by["pod"]["name"] == new_name
        assert original_spec(await world.service("rep")) == original_spec(before)

        await world.delete_tunnel("alice-new")
        await world.delete_tunnel("alice-old")
        await wait_for(lambda: unrouted(world, "rep"), 30, "unrouted after both sessions")
        assert original_spec(await world.service("rep")) == original_spec(before)


async def test_endpoint_follows_the_forwarder_and_goes_with_the_cluster(
    world: World, crds: KubeAPIServer
) -> None:
    """The forwarder pod goes not ready and back, then another replica takes the session over:
    the endpoint follows each time. The DaskCluster is deleted: no slice is left behind."""
    forwarder = await world.forwarder_pod()
    other_ip = "10.244.1.11"
    other = await world.forwarder_pod("forwarder-1", ip=other_ip)
    await world.dask_cluster("fol", "alice")
    before = await world.service("fol")
    pod = await call_json(
        world.core.read_namespaced_pod, await world.scheduler_pod_name("fol"), world.ns
    )
    async with running(world.settings(), crds) as reconciler:
        await world.tunnel("t-fol", "alice", pod, forwarder)
        await wait_for(lambda: routed_to(world, "fol"), 30, "routed to forwarder-0")

        # Not ready: the endpoint stays, marked not ready (kube-proxy skips it); Routed False.
        await world.forwarder_status("forwarder-0", ready=False)

        async def not_ready() -> bool:
            ours = await world.our_slice("fol")
            cond = await world.condition("t-fol", "Routed")
            return bool(
                ours
                and ours["endpoints"][0]["conditions"]["ready"] is False
                and cond
                and cond["reason"] == "ForwarderNotReady"
            )

        await wait_for(not_ready, 30, "the endpoint not ready with its forwarder")
        assert await world.endpoints("fol") == []
        await world.forwarder_status("forwarder-0", ready=True)
        await wait_for(lambda: routed_to(world, "fol"), 30, "ready again")

        # The agent reconnects to forwarder-1, which takes the Tunnel over (its spec and owner).
        await call_json(
            world.custom.patch_namespaced_custom_object,
            G,
            V,
            world.fwd_ns,
            "tunnels",
            "t-fol",
            {
                "metadata": {
                    "ownerReferences": [
                        {
                            "apiVersion": "v1",
                            "kind": "Pod",
                            "name": "forwarder-1",
                            "uid": other["metadata"]["uid"],
                        }
                    ]
                },
                "spec": {
                    "forwarder": {"podName": "forwarder-1", "podIP": other_ip},
                    "services": [
                        {"name": "scheduler", "port": 40051, "remotePort": 8786},
                        {"name": "dashboard", "port": 40052, "remotePort": 8787},
                    ],
                },
            },
            _content_type="application/merge-patch+json",
        )
        await wait_for(
            lambda: routed_to(world, "fol", (40051, 40052), other_ip), 30, "moved to forwarder-1"
        )
        # The forwarder pod's IP changes (a pod is never re-addressed, but the rule is the
        # same): followed through the forwarder pod watch alone.
        await world.forwarder_status("forwarder-1", ip="10.244.1.12")
        await wait_for(
            lambda: routed_to(world, "fol", (40051, 40052), "10.244.1.12"), 30, "the new IP"
        )
        assert original_spec(await world.service("fol")) == original_spec(before)

        # The user deletes the DaskCluster: the Service goes, and with it (garbage collector,
        # owner reference) our slice; the reconciler says ServiceNotFound and writes nothing.
        await call_json(
            world.custom.delete_namespaced_custom_object,
            DG,
            DV,
            world.ns,
            "daskclusters",
            "fol",
            propagation_policy="Foreground",
        )

        async def gone() -> bool:
            cond = await world.condition("t-fol", "Routed")
            return await unrouted(world, "fol") and bool(cond and cond["status"] == "False")

        await wait_for(gone, 120, "no slice left after the DaskCluster")  # GC: discovery resync
        await _reconciled_all(reconciler)
        assert await world.our_slice("fol") is None


async def test_restarts_converge(world: World, crds: KubeAPIServer) -> None:
    forwarder = await world.forwarder_pod()
    for name in ("r1", "r2", "r3"):
        await world.dask_cluster(name, "alice")
    originals = {name: await world.service(name) for name in ("r1", "r2", "r3")}
    pods = {
        name: await call_json(
            world.core.read_namespaced_pod, await world.scheduler_pod_name(name), world.ns
        )
        for name in ("r1", "r2", "r3")
    }

    async def routed(cluster: str) -> bool:
        return await routed_to(world, cluster)

    async def restored(cluster: str) -> bool:
        same = original_spec(await world.service(cluster)) == original_spec(originals[cluster])
        return same and await unrouted(world, cluster)

    settings = world.settings()
    async with running(settings, crds):
        await world.tunnel("t1", "alice", pods["r1"], forwarder)
        await wait_for(lambda: routed("r1"), 30, "r1 routed")

    # Reconciler down: one session ends, another starts. Nobody watches.
    await world.delete_tunnel("t1")
    await world.tunnel("t2", "alice", pods["r2"], forwarder)
    assert await routed("r1")  # nothing restored it yet

    async with running(settings, crds):
        await wait_for(lambda: restored("r1"), 30, "r1 restored by the new reconciler")
        await wait_for(lambda: routed("r2"), 30, "r2 routed by the new reconciler")
        await wait_for(
            lambda: _worker_env_is(
                world, "r1", (None, f"tcp://r1-scheduler.{world.ns}.svc.cluster.local:8786")
            ),
            30,
            "r1 workers restored",
        )

        # The API server restarts while a session starts and another ends.
        await world.tunnel("t3", "alice", pods["r3"], forwarder)
        await anyio.to_thread.run_sync(crds.restart_apiserver)
        await world.delete_tunnel("t2")
        await wait_for(lambda: routed("r3"), 60, "r3 routed across the API server restart")
        await wait_for(lambda: restored("r2"), 60, "r2 restored across the API server restart")
        await world.delete_tunnel("t3")
        await wait_for(lambda: restored("r3"), 30, "r3 restored")


async def _worker_env_is(world: World, cluster: str, wanted: tuple[str | None, str | None]) -> bool:
    return await world.worker_envs(cluster) == wanted


async def test_forwarder_pod_deleted_garbage_collects_tunnels(
    world: World, crds: KubeAPIServer
) -> None:
    forwarder = await world.forwarder_pod()
    clusters = ("g1", "g2")
    originals = {}
    async with running(world.settings(), crds):
        for i, name in enumerate(clusters):
            await world.dask_cluster(name, "alice")
            originals[name] = await world.service(name)
            pod = await call_json(
                world.core.read_namespaced_pod, await world.scheduler_pod_name(name), world.ns
            )
            await world.tunnel(f"t{i}", "alice", pod, forwarder)
        for name in clusters:
            await wait_for(lambda name=name: _routed(world, name), 30, f"{name} routed")
        await call_json(
            world.core.delete_namespaced_pod, "forwarder-0", world.fwd_ns, grace_period_seconds=0
        )

        async def all_restored() -> bool:
            gone = all([await world.get_tunnel(f"t{i}") is None for i in range(len(clusters))])
            same = all(
                [
                    original_spec(await world.service(c)) == original_spec(originals[c])
                    and await unrouted(world, c)
                    for c in clusters
                ]
            )
            return gone and same

        await wait_for(all_restored, 60, "Tunnels garbage-collected and slices deleted")


async def _routed(world: World, cluster: str) -> bool:
    return await routed_to(world, cluster)


async def test_job_held_ends_the_session(world: World, crds: KubeAPIServer, tmp_path: Path) -> None:
    schedd = FakeSchedd(tmp_path / "schedd", "schedd.example.org")
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("held", "alice")
    await world.dask_cluster("blip", "alice")
    original = await world.service("held")
    gids = {"held": schedd.gid(), "blip": schedd.gid()}
    for gid in gids.values():
        schedd.put_job(gid, 2)
    async with running(world.settings(), crds, schedd_factory=lambda _name: schedd):
        for name in ("held", "blip"):
            pod = await call_json(
                world.core.read_namespaced_pod, await world.scheduler_pod_name(name), world.ns
            )
            await world.tunnel(f"t-{name}", "alice", pod, forwarder, job=gids[name])

        async def running_job(name: str) -> bool:
            cond = await world.condition(f"t-{name}", "JobRunning")
            return bool(cond and cond["status"] == "True") and await _routed(world, name)

        for name in ("held", "blip"):
            await wait_for(lambda name=name: running_job(name), 30, f"{name}: JobRunning True")

        hold = "Error from slot1@worker: Job has gone over memory limit of 2048 megabytes."
        schedd.set_status(gids["held"], 5, HoldReason=hold, HoldReasonCode=34)

        async def ended() -> bool:
            gone = await world.get_tunnel("t-held") is None
            same = original_spec(await world.service("held")) == original_spec(original)
            return gone and same and await unrouted(world, "held")

        await wait_for(ended, 30, "held job: Tunnel deleted and slice deleted")

        async def hold_event() -> bool:
            events = await world.events_for("DaskCluster", "held")
            return any(e["reason"] == "JobHeld" and hold in e["message"] for e in events)

        await wait_for(hold_event, 30, "an Event carrying the HoldReason")

        # The schedd becomes unreachable: nothing changes, the condition says Unknown.
        schedd.unreachable = True

        async def unknown() -> bool:
            cond = await world.condition("t-blip", "JobRunning")
            return bool(
                cond and cond["status"] == "Unknown" and cond["reason"] == "ScheddUnreachable"
            )

        await wait_for(unknown, 30, "JobRunning Unknown")
        polls = len(schedd.query_calls)
        await wait_for(lambda: _more_polls(schedd, polls + 2), 30, "more polls while unreachable")
        assert await _routed(world, "blip")
        assert await world.get_tunnel("t-blip") is not None


async def _more_polls(schedd: FakeSchedd, n: int) -> bool:
    return len(schedd.query_calls) >= n


async def start_reconciler(
    tg: anyio.abc.TaskGroup, settings: ReconcilerSettings, kube: KubeAPIServer, **kwargs: Any
) -> tuple[Reconciler, anyio.CancelScope]:
    """A Reconciler in a task of ``tg``; cancel the returned scope to stop just this one."""

    async def body(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
        with anyio.CancelScope() as scope:
            async with await admin_client(kube) as api_client, anyio.create_task_group() as inner:
                reconciler = Reconciler(settings, api=api_client, **kwargs)
                await inner.start(reconciler.run)
                task_status.started((reconciler, scope))

    with anyio.fail_after(30):
        result: tuple[Reconciler, anyio.CancelScope] = await tg.start(body)
    return result


async def test_two_replicas_one_leader(world: World, crds: KubeAPIServer) -> None:
    forwarder = await world.forwarder_pod()
    await world.dask_cluster("l1", "alice")
    await world.dask_cluster("l2", "alice")
    pods = {
        n: await call_json(
            world.core.read_namespaced_pod, await world.scheduler_pod_name(n), world.ns
        )
        for n in ("l1", "l2")
    }
    settings = world.settings()
    async with anyio.create_task_group() as tg:
        a, stop_a = await start_reconciler(tg, settings, crds, identity="replica-a")
        await wait_for(lambda: _is_leader(a), 30, "replica-a leads")
        b, stop_b = await start_reconciler(tg, settings, crds, identity="replica-b")
        await world.tunnel("t1", "alice", pods["l1"], forwarder)
        await wait_for(lambda: _routed(world, "l1"), 30, "l1 routed")
        # The Service is patched mid-reconcile; the count goes up when that reconcile returns.
        await wait_for(lambda: _has_reconciled(a), 30, "replica-a's reconcile to finish")
        assert b.reconciles == 0
        assert not b.leader.leading
        assert b.ready_check() is None  # a standby is ready too
        lease_api = client.CoordinationV1Api(world.api)
        lease = await call_json(lease_api.read_namespaced_lease, settings.lease_name, world.fwd_ns)
        assert lease["spec"]["holderIdentity"] == "replica-a"

        # The leader stops: it releases the Lease and the standby takes over.
        stop_a.cancel()
        await wait_for(lambda: _is_leader(b), 30, "replica-b takes over")
        assert not a.leader.leading
        await world.tunnel("t2", "alice", pods["l2"], forwarder)
        await wait_for(lambda: _routed(world, "l2"), 30, "l2 routed by the new leader")
        await wait_for(lambda: _has_reconciled(b), 30, "replica-b's reconcile to finish")
        stop_b.cancel()


async def _has_reconciled(reconciler: Reconciler) -> bool:
    return reconciler.reconciles > 0


async def _is_leader(reconciler: Reconciler) -> bool:
    return reconciler.leader.leading


# -- latency ----------------------------------------------------------------------------------


async def measure_latency(
    world: World, kube: KubeAPIServer, n: int = 50, *, burst: bool = True
) -> list[float]:
    """Seconds from each Tunnel's creation to its routing EndpointSlice, for ``n`` clusters.

    The clusters exist before the reconciler starts (not measured). ``burst``: all Tunnels are
    created back to back (a forwarder restart reconnecting everyone); otherwise one at a time,
    each waited for (an idle reconciler). Our slices are observed by listing them all every
    20 ms, which bounds the measurement's resolution.
    """
    forwarder = await world.forwarder_pod()
    pods = {}
    for i in range(n):
        await world.dask_cluster(f"c{i:03d}", "alice", run=False)

    async def run(i: int) -> None:
        pods[i] = await world.run_scheduler(f"c{i:03d}")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(run, i)
    if world.vk is not None:
        world.vk.interval = 5.0  # many offloaded pods: a calmer status loop while measuring
    created: dict[str, float] = {}
    routed_at: dict[str, float] = {}

    async def observe() -> None:
        while len(routed_at) < n:
            slices = await call_json(
                world.custom.list_namespaced_custom_object,
                route.DISCOVERY_GROUP,
                "v1beta1",
                world.ns,
                route.SLICE_PLURAL,
                label_selector=route.MANAGED_SELECTOR,
            )
            now = time.perf_counter()
            for item in slices.get("items") or []:
                service = item["metadata"]["labels"][route.SERVICE_NAME_LABEL]
                cluster = service.removesuffix("-scheduler")
                ready = [e for e in item.get("endpoints") or [] if e["conditions"].get("ready")]
                if cluster in created and cluster not in routed_at and ready:
                    routed_at[cluster] = now
            await anyio.sleep(0.02)

    async with running(world.settings(), kube):
        with anyio.fail_after(10.0 * n):  # a bound, not a performance bar (see bench/)
            async with anyio.create_task_group() as tg:
                tg.start_soon(observe)
                for i in range(n):
                    cluster = f"c{i:03d}"
                    created[cluster] = time.perf_counter()
                    await world.tunnel(f"t{i:03d}", "alice", pods[i], forwarder)
                    if not burst:
                        await wait_for(
                            lambda c=cluster: _seen(routed_at, c), 30, f"{cluster} routed"
                        )
    return sorted(routed_at[c] - created[c] for c in created)


async def _seen(routed_at: dict[str, float], cluster: str) -> bool:
    return cluster in routed_at


def summary(latencies: list[float]) -> str:
    ms = [x * 1000 for x in latencies]
    p50 = ms[len(ms) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"n={len(ms)} p50={p50:.0f} ms p90={p90:.0f} ms max={max(ms):.0f} ms"


@pytest.mark.parametrize("burst", [False, True], ids=["one-at-a-time", "burst"])
async def test_many_tunnels_all_routed(
    world: World, crds: KubeAPIServer, burst: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every one of many clusters gets routed; the 50-Tunnel latency figures come from
    ``bench/reconcile_latency.py`` (benchmarks measure, tests check)."""
    latencies = await measure_latency(world, crds, 20, burst=burst)
    assert len(latencies) == 20
    with capsys.disabled():
        mode = "burst" if burst else "one at a time"
        print(f"\nTunnel created -> ready endpoint ({mode}): {summary(latencies)}")


# -- RBAC -------------------------------------------------------------------------------------


def apply_reconciler_rbac(
    kube: KubeAPIServer, namespace: str, *, network_policies: bool = True
) -> Path:
    """Apply configs/kubernetes/rbac-reconciler.yaml in ``namespace``; a kubeconfig for its SA.

    Cluster-scoped names get the namespace as suffix so tests do not collide.
    ``network_policies=False``: without the NetworkPolicy rule (an install not yet upgraded).
    """
    docs = list(yaml.safe_load_all((REPO / "configs/kubernetes/rbac-reconciler.yaml").read_text()))
    if not network_policies:
        for doc in docs:
            doc["rules"] = [
                r for r in doc.get("rules") or [] if "networkpolicies" not in r["resources"]
            ]
    paths = {
        "ServiceAccount": f"/api/v1/namespaces/{namespace}/serviceaccounts",
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "Role": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        "RoleBinding": f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
    }
    for doc in docs:
        text = json.dumps(doc).replace('"namespace": "jobtunnel"', f'"namespace": "{namespace}"')
        obj = json.loads(text)
        if obj["kind"].startswith("Cluster"):
            obj["metadata"]["name"] = f"jobtunnel-reconciler-{namespace}"
            if obj["kind"] == "ClusterRoleBinding":
                obj["roleRef"]["name"] = f"jobtunnel-reconciler-{namespace}"
        status, body = kube.request("POST", paths[obj["kind"]], obj)
        if status not in (201, 409):
            raise RuntimeError(f"{obj['kind']}: {status} {body}")
    token = kube.service_account_token(namespace, "jobtunnel-reconciler")
    return kube.write_kubeconfig(
        kube.directory / f"{namespace}-reconciler.kubeconfig", token, user="reconciler"
    )


async def test_routing_does_not_wait_for_a_network_policy_it_may_not_write(
    world: World, crds: KubeAPIServer
) -> None:
    """RBAC without networkpolicies (an install not yet upgraded): the Tunnel is routed anyway,
    the refusal counted (errors{kind="networkpolicy"}), no policy written."""
    kubeconfig = await anyio.to_thread.run_sync(
        functools.partial(apply_reconciler_rbac, crds, world.fwd_ns, network_policies=False)
    )
    try:
        forwarder = await world.forwarder_pod()
        await world.dask_cluster("np", "alice")
        pod = await call_json(
            world.core.read_namespaced_pod, await world.scheduler_pod_name("np"), world.ns
        )
        async with await client_for(kubeconfig) as sa_api, anyio.create_task_group() as tg:
            settings = dataclasses.replace(world.settings(), network_policies=True)
            reconciler = Reconciler(settings, api=sa_api)
            with anyio.fail_after(30):
                await tg.start(reconciler.run)
            await world.tunnel("np-1", "alice", pod, forwarder)
            await wait_for(lambda: _routed(world, "np"), 30, "routed without a policy")
            errors = reconciler.metrics.errors.labels(kind="networkpolicy")
            assert errors._value.get() >= 1
            assert await world.network_policy("np-1") is None
            tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(delete_reconciler_rbac, crds, world.fwd_ns)


async def client_for(kubeconfig: Path) -> client.ApiClient:
    """An API client authenticated by ``kubeconfig`` (e.g. a service account's)."""
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


def delete_reconciler_rbac(kube: KubeAPIServer, namespace: str) -> None:
    name = f"jobtunnel-reconciler-{namespace}"
    kube.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}")
    kube.request("DELETE", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}")


async def test_least_privilege_rbac_is_enough(
    world: World, crds: KubeAPIServer, tmp_path: Path
) -> None:
    """The reconciler does its whole job as the service account of rbac-reconciler.yaml."""
    kubeconfig = await anyio.to_thread.run_sync(apply_reconciler_rbac, crds, world.fwd_ns)
    schedd = FakeSchedd(tmp_path / "schedd", "schedd.example.org")
    gid = schedd.gid()
    schedd.put_job(gid, 2)
    try:
        forwarder = await world.forwarder_pod()
        await world.dask_cluster("rb", "alice")
        before = await world.service("rb")
        pod = await call_json(
            world.core.read_namespaced_pod, await world.scheduler_pod_name("rb"), world.ns
        )
        async with await client_for(kubeconfig) as sa_api, anyio.create_task_group() as tg:
            reconciler = Reconciler(world.settings(), api=sa_api, schedd_factory=lambda _n: schedd)
            with anyio.fail_after(30):
                await tg.start(reconciler.run)
            await world.tunnel("rb-1", "alice", pod, forwarder, job=gid)

            async def everything() -> bool:
                conds = await world.pod_conditions(pod["metadata"]["name"])
                job = await world.condition("rb-1", "JobRunning")
                return (
                    await _routed(world, "rb")
                    and await world.worker_envs("rb") == ("tcp://192.168.7.21:8786",) * 2
                    and conds.get("ContainersReady") == "True"
                    and bool(job and job["status"] == "True")
                    and "Routed" in await world.reasons("DaskCluster", "rb")
                    and await world.network_policy("rb-1") is not None
                )

            await wait_for(everything, 30, "routing, workers, readiness, job, Events as the SA")
            schedd.set_status(gid, 3, RemoveReason="via condor_rm (by user alice)")

            async def ended() -> bool:
                gone = await world.get_tunnel("rb-1") is None
                same = original_spec(await world.service("rb")) == original_spec(before)
                no_policy = await world.network_policy("rb-1") is None
                return gone and same and no_policy and await unrouted(world, "rb")

            await wait_for(ended, 30, "removed job: Tunnel and slice deleted as the SA")
            assert reconciler.metrics.errors.labels(kind="api")._value.get() == 0
            tg.cancel_scope.cancel()
    finally:
        await anyio.to_thread.run_sync(delete_reconciler_rbac, crds, world.fwd_ns)
