"""End to end with the real Dask operator: operator -> agent -> SSH -> forwarder -> Tunnel ->
reconciler -> Service, workers, readiness -- and what kr8s / KubeCluster and the operator see.

Everything is real except what no machine here can run: the real dask-kubernetes operator (kopf,
``tests/dask_operator.py``) against the real kube-apiserver + kube-controller-manager
(``tests/kube.py``); the real forwarder with its :class:`KubernetesPublisher`, real agents over
real SSH, the real reconciler, all three in this process; a real ``dask scheduler`` subprocess
as the service behind the agents. ``run_pod`` plays kube-scheduler (bind to the virtual node)
and the first status of InterLink's virtual kubelet (Running, ``Ready`` only).

Layout, as an operator installs it: the forwarder pod and its Tunnels in a namespace of their
own (the reconciler's ``namespace``), the DaskClusters and their scheduler pods in a user
namespace (the hub's, where users are told apart by the KubeSpawner label
``hub.jupyter.org/username``, which the operator copies into the scheduler's pod template). The
routed Service is never modified: the reconciler's EndpointSlice points it at the forwarder pod.

The forwarder pod is an object whose status the test writes (Ready, a non-loopback pod IP); the
forwarder itself listens on 127.0.0.1, so traffic tests dial ``127.0.0.1:<listener port>`` and
Kubernetes-side assertions look at the EndpointSlices. Every pod on the virtual node has its
status overwritten throughout by ``tests/fakes/virtual_kubelet.py`` (podIP 127.0.0.1, conditions
replaced by ``[Ready]`` on every loop), as InterLink's virtual kubelet does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import dask
import distributed
import kr8s.asyncio
import pytest
from kr8s._api import Api
from kr8s.asyncio.objects import Pod as Kr8sPod
from kr8s.asyncio.objects import Service as Kr8sService
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from daemons.agent.session import AgentIdentity, AgentSession
from daemons.forwarder.kube import KubernetesPublisher
from daemons.reconciler.controller import Reconciler
from daemons.reconciler.kube import call_json, get_or_none
from shared import protocol as p
from tests.dask_operator import VIRTUAL_NODE, DaskOperator, dask_operator  # noqa: F401
from tests.fakes.virtual_kubelet import FakeVirtualKubelet, running_virtual_kubelet
from tests.harness import (
    RunningForwarder,
    agent_settings,
    base_env,
    dask_scheduler_argv,
    forwarder_settings,
    free_port,
    http_get,
    process,
    running_agent,
    running_forwarder,
    wait_for_sync,
    write_token_file,
)
from tests.kube import KubeAPIServer, kube_api  # noqa: F401
from tests.test_reconciler_kube import (
    USER_LABEL,
    World,
    admin_client,
    apply_crds,
    original_spec,
    settings_for,
    start_reconciler,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    # kr8s warns that the 1.20 test apiserver is older than it supports (see the fixture
    # kr8s_discovery_as_in_supported_kubernetes for the one difference that matters).
    pytest.mark.filterwarnings("ignore:Kubernetes version v1.20:UserWarning"),
]

G, V = "jobtunnel.io", "v1alpha1"
DG, DV = "kubernetes.dask.org", "v1"
TOKENS = {
    "alice": "alice-token-0123456789",
    "bob": "bob-token-0123456789",
    "mallory": "mallory-token-0123456789",
}
FORWARDER_POD = "jobtunnel-forwarder-0"
#: Generous deadlines: a loaded 2-core machine runs etcd, the apiserver, the controller-manager,
#: kopf, a dask scheduler and this process.
DEADLINE = 60.0
#: kube-controller-manager's garbage collector may need a discovery resync (30 s) for new kinds.
GC_DEADLINE = 120.0
#: The scheduler's HTTP routes: dask's defaults plus the API the operator's autoscaler and
#: retire path call (``/api/v1/adaptive_target``, ``/api/v1/retire_workers``).
API_ROUTE = "distributed.http.scheduler.api"

_forwarder_ips = (f"10.245.{i // 250}.{i % 250 + 2}" for i in itertools.count())


async def wait_for(predicate: Any, seconds: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` (an async callable) until truthy; fail after ``seconds``."""
    interval = 0.05
    with anyio.move_on_after(seconds):
        while True:
            result = await predicate()
            if result:
                return result
            await anyio.sleep(interval)
            interval = min(interval * 1.5, 0.5)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube(dask_operator: DaskOperator) -> KubeAPIServer:  # noqa: F811
    """The session's control plane with the real operator running and the Tunnel CRD."""
    apply_crds(dask_operator.kube)
    return dask_operator.kube


@pytest.fixture(autouse=True)
def kr8s_discovery_as_in_supported_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    """kr8s (0.20, for Kubernetes 1.28+) names kinds by the discovery field ``singularName``,
    which Kubernetes serves for built-in resources only since 1.27; this test apiserver is
    1.20, where it is empty, and kr8s then turns listed pods into a nameless class that
    ``Service.ready()`` rejects (``TypeError: Unexpected type``). Fill it in as a supported
    apiserver does (the lowercase kind); nothing else of kr8s is touched."""
    original = Api.async_api_resources_uncached

    async def resources(self: Api) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await original(self)
        for resource in found:
            if not resource.get("singularName") and resource.get("kind"):
                resource["singularName"] = str(resource["kind"]).lower()
        return found

    monkeypatch.setattr(Api, "async_api_resources_uncached", resources)


@dataclass(frozen=True)
class Scheduler:
    port: int
    dashboard: int


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scheduler]:
    """One real ``dask scheduler`` (with the HTTP API enabled) behind every agent of the module."""
    port, dashboard = free_port(), free_port()
    routes = list(dask.config.get("distributed.scheduler.http.routes"))
    if API_ROUTE not in routes:
        routes.append(API_ROUTE)
    env = base_env()
    env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"] = repr(routes)
    log = tmp_path_factory.mktemp("scheduler") / "scheduler.log"
    with process(dask_scheduler_argv(port, dashboard), log, env=env) as proc:

        def answers() -> bool:
            assert proc.proc.poll() is None, proc.log()
            try:
                return http_get(f"http://127.0.0.1:{dashboard}/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for_sync(answers, DEADLINE, "the dask scheduler to answer")
        yield Scheduler(port, dashboard)


@dataclass
class Stack:
    """One test's namespace, its forwarder pod object, and ways to run the daemons in it."""

    kube: KubeAPIServer
    operator: DaskOperator
    api: client.ApiClient
    ns: str
    tmp: Path
    forwarder_ip: str
    forwarder_uid: str
    #: The forwarder's namespace (its pod, its Tunnels, the reconciler's Lease).
    fwd_ns: str
    vk: FakeVirtualKubelet
    #: Reconciler settings of this layout (e.g. the ``<prefix>-{user}`` namespace rule).
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def world(self) -> World:
        return World(self.api, self.ns, self.fwd_ns, self.vk)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @contextlib.asynccontextmanager
    async def forwarder(self, **overrides: Any) -> AsyncIterator[RunningForwarder]:
        """The real forwarder publishing Tunnels as ``FORWARDER_POD`` (KubernetesPublisher)."""
        async with await admin_client(self.kube) as api:
            publisher = KubernetesPublisher(
                api,
                namespace=self.fwd_ns,
                pod_name=FORWARDER_POD,
                pod_ip=self.forwarder_ip,
                heartbeat_interval=30.0,
                registry=CollectorRegistry(),
                request_timeout=10.0,
                backoff_max=1.0,
            )
            settings = forwarder_settings(self.tmp, advertise_host=self.forwarder_ip, **overrides)
            async with running_forwarder(settings, publisher=publisher) as fw:
                await wait_for(
                    lambda: _true(publisher.ready_check() is None), DEADLINE, "publisher synced"
                )
                yield fw

    @contextlib.asynccontextmanager
    async def reconciler(self) -> AsyncIterator[Reconciler]:
        async with anyio.create_task_group() as tg:
            reconciler, scope = await start_reconciler(tg, self.settings(), self.kube)
            try:
                yield reconciler
            finally:
                scope.cancel()

    def settings(self) -> Any:
        # The stand-in operator pod lives in the forwarder's namespace.
        rules = {"user_namespace": self.ns, "operator_namespace": self.fwd_ns, **self.rules}
        return settings_for(self.fwd_ns, virtual_node=VIRTUAL_NODE, **rules)

    @contextlib.asynccontextmanager
    async def agent(
        self,
        fw: RunningForwarder,
        scheduler: Scheduler,
        pod: client.V1Pod,
        *,
        user: str = "alice",
        uid: str | None = None,
        private_ip: str = "192.168.7.21",
        published: bool = True,
        **overrides: Any,
    ) -> AsyncIterator[AgentSession]:
        """A real agent (real SSH) claiming ``pod`` (``uid``: a different claimed UID)."""
        settings = agent_settings(
            fw,
            user=user,
            token=TOKENS[user],
            services=(("scheduler", scheduler.port), ("dashboard", scheduler.dashboard)),
            **overrides,
        )
        identity = AgentIdentity(
            instance_id=uuid.uuid4().hex,
            private_ip=private_ip,
            pod=p.PodInfo(
                namespace=self.ns, name=pod.metadata.name, uid=uid or str(pod.metadata.uid)
            ),
        )
        async with running_agent(settings, identity, published=published) as session:
            yield session

    # -- the Dask operator's side ------------------------------------------------------------

    async def cluster(
        self, name: str, user: str, *, node: str = VIRTUAL_NODE, **kwargs: Any
    ) -> client.V1Pod:
        """A DaskCluster of ``user`` made by the real operator; its scheduler pod "run" on
        ``node`` (the virtual node unless told otherwise)."""
        await self.operator.create_cluster(self.ns, name, labels={USER_LABEL: user}, **kwargs)
        await self.operator.wait_for_objects(self.ns, name)
        return await self.operator.run_pod(self.ns, f"{name}-scheduler", node=node)

    # -- reads -------------------------------------------------------------------------------

    async def tunnel_of(self, session: AgentSession) -> dict[str, Any] | None:
        items = await call_json(
            client.CustomObjectsApi(self.api).list_namespaced_custom_object,
            G,
            V,
            self.fwd_ns,
            "tunnels",
        )
        for item in items.get("items") or []:
            if item["spec"]["sessionId"] == session.state.session_id:
                return dict(item)
        return None

    async def tunnel_condition(self, session: AgentSession, kind: str) -> dict[str, Any] | None:
        tunnel = await self.tunnel_of(session)
        for cond in ((tunnel or {}).get("status") or {}).get("conditions") or []:
            if cond["type"] == kind:
                return dict(cond)
        return None

    async def worker_envs(self, cluster: str) -> dict[str, set[str | None]]:
        """DASK_SCHEDULER_ADDRESS of every container: of each worker group, each Deployment."""

        def env(containers: list[dict[str, Any]]) -> set[str | None]:
            found: set[str | None] = set()
            for container in containers:
                values = [
                    e.get("value")
                    for e in container.get("env") or []
                    if e["name"] == "DASK_SCHEDULER_ADDRESS"
                ]
                found.add(values[0] if values else None)
            return found

        groups = await call_json(
            client.CustomObjectsApi(self.api).list_namespaced_custom_object,
            DG,
            DV,
            self.ns,
            "daskworkergroups",
        )
        deployments = await call_json(
            client.AppsV1Api(self.api).list_namespaced_deployment,
            self.ns,
            label_selector=f"dask.org/cluster-name={cluster},dask.org/component=worker",
        )
        out: dict[str, set[str | None]] = {}
        for group in groups.get("items") or []:
            if group["spec"].get("cluster") == cluster:
                out[f"DaskWorkerGroup/{group['metadata']['name']}"] = env(
                    group["spec"]["worker"]["spec"]["containers"]
                )
        for dep in deployments.get("items") or []:
            out[f"Deployment/{dep['metadata']['name']}"] = env(
                dep["spec"]["template"]["spec"]["containers"]
            )
        return out

    async def kr8s_ready(self, pod_name: str, cluster: str) -> tuple[bool, bool]:
        """kr8s' own ``Pod.ready()`` and ``Service.ready()``, what ``KubeCluster`` waits on."""
        api = await kr8s.asyncio.api(kubeconfig=str(self.kube.kubeconfig))
        pod = await Kr8sPod.get(pod_name, namespace=self.ns, api=api)
        service = await Kr8sService.get(f"{cluster}-scheduler", namespace=self.ns, api=api)
        return bool(await pod.ready()), bool(await service.ready())


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
async def stack(
    kube: KubeAPIServer,
    dask_operator: DaskOperator,  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    async with make_stack(kube, dask_operator, tmp_path, "e2e", next(_forwarder_ips)) as made:
        yield made


@contextlib.asynccontextmanager
async def make_stack(
    kube: KubeAPIServer,
    operator: DaskOperator,
    tmp_path: Path,
    prefix: str,
    ip: str,
    *,
    per_user_namespace: bool = False,
) -> AsyncIterator[Stack]:
    """Two fresh namespaces (users', forwarder's), the forwarder pod object, the fake virtual
    kubelet on the users' namespace; everything deleted afterwards.

    The users' namespace is the hub's (users told apart by label), or with
    ``per_user_namespace`` alice's own ``<base>-alice`` under the rule ``<base>-{user}``
    (KubeSpawner's ``jupyter-{user}`` layout)."""
    write_token_file(tmp_path / "tokens", TOKENS)
    base = f"{prefix}-{uuid.uuid4().hex[:8]}"
    ns, fwd_ns = f"{base}-hub", f"{base}-jobtunnel"
    rules: dict[str, Any] = {}
    if per_user_namespace:
        ns = f"{base}-alice"
        rules = {"user_namespace": f"{base}-{{user}}", "user_label": ""}
    async with await admin_client(kube) as api:
        core = client.CoreV1Api(api)
        for name in (ns, fwd_ns):
            await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        try:
            uid = await create_forwarder_pod(core, fwd_ns, ip)
            async with running_virtual_kubelet(api, [ns], VIRTUAL_NODE, interval=2.0) as vk:
                yield Stack(kube, operator, api, ns, tmp_path, ip, uid, fwd_ns, vk, rules)
        finally:
            with anyio.CancelScope(shield=True):
                await _clean_namespace(api, operator, ns)
                await call_json(core.delete_namespace, fwd_ns)


async def create_forwarder_pod(core: client.CoreV1Api, ns: str, ip: str) -> str:
    """The forwarder pod object: Running, Ready and ContainersReady, on a non-loopback IP."""
    pod = await call_json(
        core.create_namespaced_pod,
        ns,
        {
            "metadata": {"name": FORWARDER_POD, "labels": {"app": "jobtunnel-forwarder"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "forwarder", "image": "jobtunnel/forwarder"}],
            },
        },
    )
    await call_json(
        core.patch_namespaced_pod_status,
        FORWARDER_POD,
        ns,
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                ],
            }
        },
        _content_type="application/strategic-merge-patch+json",
    )
    return str(pod["metadata"]["uid"])


async def _clean_namespace(api: client.ApiClient, operator: DaskOperator, ns: str) -> None:
    """Delete the DaskClusters and wait until the operator's objects are gone (so no kopf
    handler of this test runs into the next one), then the namespace."""
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    clusters = await call_json(custom.list_namespaced_custom_object, DG, DV, ns, "daskclusters")
    names = [c["metadata"]["name"] for c in clusters.get("items") or []]
    for name in names:
        with contextlib.suppress(ApiException):
            await call_json(
                custom.delete_namespaced_custom_object, DG, DV, ns, "daskclusters", name
            )
    # Pods made by hand (forged claims) are nobody's to collect.
    pods = await call_json(core.list_namespaced_pod, ns)
    for pod in pods.get("items") or []:
        if not pod["metadata"].get("ownerReferences"):
            with contextlib.suppress(ApiException):
                await call_json(
                    core.delete_namespaced_pod, pod["metadata"]["name"], ns, grace_period_seconds=0
                )
    for name in names:
        await operator.wait_for_cluster_gone(ns, name)
    await call_json(core.delete_namespace, ns)


# -- assertions shared by the tests ------------------------------------------------------------


async def tunnels_json(fw: RunningForwarder) -> list[dict[str, Any]]:
    """The forwarder's sessions as ``/tunnels`` renders them (not served in Kubernetes mode)."""
    return fw.tunnels()


async def listener_ports(fw: RunningForwarder, session: AgentSession) -> dict[str, int]:
    """Service name -> listener port, from the forwarder's /tunnels (the HTTP endpoint)."""
    for entry in await tunnels_json(fw):
        if entry["id"] == session.state.session_id:
            services = entry["services"]
            assert isinstance(services, dict)
            return {name: int(str(addr).rpartition(":")[2]) for name, addr in services.items()}
    raise AssertionError(f"session {session.state.session_id} not in /tunnels")


async def endpoints_are(stack: Stack, cluster: str, ports: dict[str, int]) -> bool:
    """What kube-proxy sees: one ready endpoint, the forwarder pod, the listener ports under
    the Service's port names."""
    wanted = [
        (
            stack.forwarder_ip,
            {"tcp-comm": ports["scheduler"], "http-dashboard": ports["dashboard"]},
        )
    ]
    return await stack.world.endpoints(cluster) == wanted


async def unrouted(stack: Stack, cluster: str) -> bool:
    return await stack.world.our_slice(cluster) is None


async def routed_condition(stack: Stack, session: AgentSession) -> bool:
    cond = await stack.tunnel_condition(session, "Routed")
    return bool(cond and cond["status"] == "True")


async def fully_routed(
    stack: Stack, fw: RunningForwarder, session: AgentSession, cluster: str, pod_name: str
) -> bool:
    """EndpointSlice, Tunnel condition and scheduler pod readiness all say "routed"."""
    ports = await listener_ports(fw, session)
    conditions = await stack.world.pod_conditions(pod_name)
    return (
        await endpoints_are(stack, cluster, ports)
        and await routed_condition(stack, session)
        and conditions.get("ContainersReady") == "True"
        and conditions.get("Ready") == "True"
    )


async def workers_point_at(stack: Stack, cluster: str, address: str, n: int) -> bool:
    """Every worker group and ``n`` worker Deployments carry exactly ``address``."""
    envs = await stack.worker_envs(cluster)
    deployments = [k for k in envs if k.startswith("Deployment/")]
    return len(deployments) == n and all(values == {address} for values in envs.values())


def scheduler_info(port: int) -> dict[str, Any]:
    """A real dask Client through the tunnel's scheduler listener (blocking; run in a thread)."""
    with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=30) as dask_client:
        info: dict[str, Any] = dask_client.scheduler_info()
        return info


async def _has_reason(stack: Stack, kind: str, name: str, reason: str) -> bool:
    return reason in await stack.world.reasons(kind, name)


# -- tests -------------------------------------------------------------------------------------


async def test_operator_cluster_end_to_end(
    stack: Stack,
    scheduler: Scheduler,
    dask_operator: DaskOperator,  # noqa: F811
) -> None:
    """A DaskCluster made by the real operator, its scheduler offloaded: routed, used, undone."""
    since = dask_operator.log_offset()
    pod = await stack.cluster("analysis", "alice")
    pod_name = str(pod.metadata.name)
    before = await stack.world.service("analysis")
    objects = await dask_operator.wait_for_objects(stack.ns, "analysis")
    operator_address = f"tcp://analysis-scheduler.{stack.ns}.svc.cluster.local:8786"

    # The owner chain the reconciler checks, as the real operator and controllers make it.
    apps = client.AppsV1Api(stack.api)
    pod_obj = await call_json(stack.core.read_namespaced_pod, pod_name, stack.ns)
    (pod_ref,) = pod_obj["metadata"]["ownerReferences"]
    assert (pod_ref["kind"], pod_ref["apiVersion"], pod_ref["controller"]) == (
        "ReplicaSet",
        "apps/v1",
        True,
    )
    rs = await call_json(apps.read_namespaced_replica_set, pod_ref["name"], stack.ns)
    assert rs["metadata"]["uid"] == pod_ref["uid"]
    (rs_ref,) = rs["metadata"]["ownerReferences"]
    assert (rs_ref["kind"], rs_ref["name"], rs_ref["controller"]) == (
        "Deployment",
        "analysis-scheduler",
        True,
    )
    deployment = await call_json(apps.read_namespaced_deployment, "analysis-scheduler", stack.ns)
    assert deployment["metadata"]["uid"] == rs_ref["uid"]
    (dep_ref,) = deployment["metadata"]["ownerReferences"]
    assert dep_ref == {
        "apiVersion": f"{DG}/{DV}",
        "kind": "DaskCluster",
        "name": "analysis",
        "uid": objects.cluster["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert deployment["spec"]["template"]["metadata"]["labels"][USER_LABEL] == "alice"
    assert pod_obj["metadata"]["labels"][USER_LABEL] == "alice"

    # Before any tunnel: the pod is Ready only, so kr8s (KubeCluster) would wait forever.
    assert await stack.kr8s_ready(pod_name, "analysis") == (False, False)

    async with stack.forwarder() as fw, stack.reconciler():
        # Waiting for the scheduler pod as KubeCluster does still says "not ready".
        assert (await stack.kr8s_ready(pod_name, "analysis"))[0] is False
        async with stack.agent(fw, scheduler, pod, private_ip="192.168.7.21") as agent:
            await wait_for(
                lambda: fully_routed(stack, fw, agent, "analysis", pod_name),
                DEADLINE,
                "Service, Endpoints, Routed condition and pod readiness",
            )
            ports = await listener_ports(fw, agent)
            # The operator's Service, byte for byte as it made it.
            assert original_spec(await stack.world.service("analysis")) == original_spec(before)
            # The forwarder pod carries no dask.org/* label (issue 6).
            fwd = await call_json(stack.core.read_namespaced_pod, FORWARDER_POD, stack.fwd_ns)
            assert not [k for k in fwd["metadata"]["labels"] if k.startswith("dask.org/")]

            address = f"tcp://192.168.7.21:{scheduler.port}"
            await wait_for(
                lambda: workers_point_at(stack, "analysis", address, 1),
                DEADLINE,
                "DASK_SCHEDULER_ADDRESS on the worker group and the worker Deployment",
            )
            await wait_for(
                lambda: _has_reason(stack, "DaskCluster", "analysis", "Routed"),
                DEADLINE,
                "the Routed Event on the DaskCluster",
            )

            # kr8s' own checks, what a plain KubeCluster waits for, now pass.
            await wait_for(lambda: _kr8s_both(stack, pod_name, "analysis"), DEADLINE, "kr8s ready")

            # A scale-up: the operator copies the routed worker group into the new Deployment.
            await dask_operator.scale(stack.ns, "analysis", 2)
            await dask_operator.wait_for_objects(stack.ns, "analysis", n_workers=2)
            await wait_for(
                lambda: workers_point_at(stack, "analysis", address, 2),
                DEADLINE,
                "the new worker Deployment to carry the private address",
            )

            # A real dask Client through the scheduler listener.
            info = await anyio.to_thread.run_sync(scheduler_info, ports["scheduler"])
            assert info["type"] == "Scheduler"
            assert info["address"] == f"tcp://127.0.0.1:{scheduler.port}"

            # The dashboard port: what the operator's autoscaler/retire path and a browser use.
            await check_dashboard(ports["dashboard"])
            # All along, the virtual kubelet kept overwriting the pod's status.
            assert stack.vk.loops >= 2
            assert original_spec(await stack.world.service("analysis")) == original_spec(before)

            # Nothing above made kopf fail or retry.
            dask_operator.check_alive()
            assert dask_operator.problems(since) == [], dask_operator.log()[since:]

        # The agent left (bye): everything back as the operator made it.
        async def undone() -> bool:
            service = await stack.world.service("analysis")
            conditions = await stack.world.pod_conditions(pod_name)
            return (
                original_spec(service) == original_spec(before)
                and await unrouted(stack, "analysis")
                and await stack.tunnel_of(agent) is None
                and not await tunnels_json(fw)
                and conditions.get("ContainersReady") != "True"
            )

        await wait_for(undone, DEADLINE, "slice deleted, Tunnel gone, not ContainersReady")
        await wait_for(
            lambda: _workers_restored(stack, "analysis", operator_address),
            DEADLINE,
            "the worker Deployments' address restored",
        )
        await wait_for(
            lambda: _has_reason(stack, "DaskCluster", "analysis", "Unrouted"),
            DEADLINE,
            "the Unrouted Event",
        )
        await stack.vk.next_loops(2)
        assert await stack.kr8s_ready(pod_name, "analysis") == (False, False)
    dask_operator.check_alive()
    assert dask_operator.problems(since) == [], dask_operator.log()[since:]


async def _kr8s_both(stack: Stack, pod_name: str, cluster: str) -> bool:
    return await stack.kr8s_ready(pod_name, cluster) == (True, True)


async def _workers_restored(stack: Stack, cluster: str, operator_address: str) -> bool:
    envs = await stack.worker_envs(cluster)
    groups = [v for k, v in envs.items() if k.startswith("DaskWorkerGroup/")]
    deployments = [v for k, v in envs.items() if k.startswith("Deployment/")]
    return all(v == {None} for v in groups) and all(v == {operator_address} for v in deployments)


async def check_dashboard(port: int) -> None:
    """The scheduler's HTTP API, dashboard page and Bokeh WebSocket through the tunnel."""
    base = f"127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # What the operator's autoscaler polls (and, beside it, retire_workers / check_idle).
        async with session.get(f"http://{base}/api/v1/adaptive_target") as resp:
            assert resp.status == 200, await resp.text()
            assert "workers" in json.loads(await resp.text())
        async with session.get(f"http://{base}/status") as resp:
            assert resp.status == 200
            page = await resp.text()
        # Bokeh server documents: the page carries a session token that the WebSocket at
        # <app path>/ws takes as its second subprotocol.
        match = re.search(r'"token":\s*"([^"]+)"', page)
        assert match, "no Bokeh session token in the /status page"
        async with session.ws_connect(
            f"ws://{base}/status/ws", protocols=("bokeh", match.group(1))
        ) as ws:
            assert ws.protocol == "bokeh"
            message = await ws.receive(timeout=30)
            assert message.type == aiohttp.WSMsgType.TEXT, message
            assert "ACK" in str(message.data), message.data


async def test_forged_claims_are_never_routed(
    stack: Stack,
    scheduler: Scheduler,
) -> None:
    """Another user's pod, a wrong UID, a pod off the virtual node, a pod outside the owner
    chain: real agents over real SSH, never routed, each with an Event."""
    bob_pod = await stack.cluster("bobs", "bob")
    # Mallory's own cluster, its scheduler on an ordinary node.
    local_pod = await stack.cluster(
        "local", "mallory", scheduler_node_selector=None, tolerations=None, node="node-1"
    )
    # A pod Mallory made herself: Bob's cluster label, her own user label, on the virtual node.
    forged = await stack.world.forged_pod(
        "bobs", "bobs-scheduler-forged", "mallory", node=VIRTUAL_NODE
    )
    forged_pod = await stack.core.read_namespaced_pod(forged["metadata"]["name"], stack.ns)
    before = {c: await stack.world.service(c) for c in ("bobs", "local")}
    claims = [
        ("mallory", bob_pod, None, "WrongUser", "bobs"),
        ("bob", bob_pod, str(uuid.uuid4()), "UIDMismatch", "bobs"),
        ("mallory", local_pod, None, "NotOnVirtualNode", "local"),
        ("mallory", forged_pod, None, "NotOwnedByCluster", "bobs"),
    ]
    changed: list[str] = []
    async with stack.forwarder() as fw, stack.reconciler(), contextlib.AsyncExitStack() as agents:
        sessions = [
            await agents.enter_async_context(
                stack.agent(fw, scheduler, pod, user=user, uid=uid, private_ip="10.99.0.1")
            )
            for user, pod, uid, _, _ in claims
        ]

        async def all_refused() -> bool:
            for cluster, original in before.items():
                if original_spec(await stack.world.service(cluster)) != original_spec(original):
                    changed.append(cluster)
                if not await unrouted(stack, cluster):
                    changed.append(f"{cluster}: EndpointSlice")
            for session, (_, _, _, reason, _) in zip(sessions, claims, strict=True):
                verified = await stack.tunnel_condition(session, "Verified")
                routed = await stack.tunnel_condition(session, "Routed")
                if not verified or (verified["status"], verified["reason"]) != ("False", reason):
                    return False
                if not routed or routed["status"] != "False":
                    return False
            return True

        await wait_for(all_refused, DEADLINE, "all four claims refused")

        async def events() -> bool:
            for session in sessions:
                tunnel = await stack.tunnel_of(session)
                assert tunnel is not None
                if "Refused" not in await stack.world.reasons("Tunnel", tunnel["metadata"]["name"]):
                    return False
            return await _has_reason(stack, "DaskCluster", "bobs", "TunnelRefused")

        await wait_for(events, DEADLINE, "Refused Events on the Tunnels and Bob's DaskCluster")
        assert changed == [], f"a forged claim was routed: {changed}"
        for cluster, original in before.items():
            service = await stack.world.service(cluster)
            assert original_spec(service) == original_spec(original)
            assert await unrouted(stack, cluster)
        assert (await stack.world.pod_conditions(bob_pod.metadata.name)).get(
            "ContainersReady"
        ) is None
        envs = await stack.worker_envs("bobs")
        assert all(values == {None} for k, values in envs.items() if "WorkerGroup" in k)


@dataclass
class RoutedSession:
    fw: RunningForwarder
    tg: anyio.abc.TaskGroup
    agent: AgentSession
    pod_name: str
    address: str
    reconciler: Reconciler
    scope: anyio.CancelScope


@contextlib.asynccontextmanager
async def routed_with_own_reconciler(
    stack: Stack, scheduler: Scheduler, cluster: str, private_ip: str
) -> AsyncIterator[RoutedSession]:
    """Alice's cluster routed to a live session, by a reconciler the test may stop and start
    (its own scope, in the yielded task group); workers pointed at the private IP."""
    pod = await stack.cluster(cluster, "alice")
    pod_name = str(pod.metadata.name)
    address = f"tcp://{private_ip}:{scheduler.port}"
    async with (
        stack.forwarder() as fw,
        anyio.create_task_group() as tg,
        stack.agent(fw, scheduler, pod, private_ip=private_ip) as agent,
    ):
        reconciler, scope = await start_reconciler(tg, stack.settings(), stack.kube)
        await wait_for(
            lambda: fully_routed(stack, fw, agent, cluster, pod_name), DEADLINE, "routed"
        )
        await wait_for(lambda: workers_point_at(stack, cluster, address, 1), DEADLINE, "env")
        yield RoutedSession(fw, tg, agent, pod_name, address, reconciler, scope)


async def test_restarts_converge(
    stack: Stack,
    scheduler: Scheduler,
    dask_operator: DaskOperator,  # noqa: F811
) -> None:
    """Reconciler restarted mid-way, apiserver restarted mid-way: the same routed state."""
    async with routed_with_own_reconciler(stack, scheduler, "resilient", "192.168.7.33") as r:
        fw, tg, agent, pod_name, address = r.fw, r.tg, r.agent, r.pod_name, r.address
        first = r.scope
        routed_service = (await stack.world.service("resilient"))["spec"]

        # The reconciler stops; meanwhile the virtual kubelet wipes ContainersReady and the
        # cluster scales up. Nobody watches.
        first.cancel()
        await stack.vk.next_loops(2)
        assert (await stack.world.pod_conditions(pod_name)).get("ContainersReady") is None
        await dask_operator.scale(stack.ns, "resilient", 2)
        await dask_operator.wait_for_objects(stack.ns, "resilient", n_workers=2)
        _, second = await start_reconciler(tg, stack.settings(), stack.kube)
        await wait_for(
            lambda: fully_routed(stack, fw, agent, "resilient", pod_name),
            DEADLINE,
            "routed again after the reconciler restart",
        )
        await wait_for(lambda: workers_point_at(stack, "resilient", address, 2), DEADLINE, "env")
        assert (await stack.world.service("resilient"))["spec"] == routed_service

        # The API server restarts under the forwarder, the reconciler and the operator; the
        # cluster scales up again right after, and ContainersReady is reset once more.
        await anyio.to_thread.run_sync(stack.kube.restart_apiserver)
        await dask_operator.scale(stack.ns, "resilient", 3)
        await dask_operator.wait_for_objects(stack.ns, "resilient", n_workers=3)
        await wait_for(
            lambda: fully_routed(stack, fw, agent, "resilient", pod_name),
            DEADLINE,
            "routed after the API server restart",
        )
        await wait_for(lambda: workers_point_at(stack, "resilient", address, 3), DEADLINE, "env")
        assert (await stack.world.service("resilient"))["spec"] == routed_service
        assert len(await tunnels_json(fw)) == 1
        second.cancel()


async def test_reconciler_killed_mid_reconcile_loses_no_route(
    stack: Stack,
    scheduler: Scheduler,
    dask_operator: DaskOperator,  # noqa: F811
) -> None:
    """The leader is cancelled inside a reconcile (between the slice and the workers): the live
    session's EndpointSlice is never touched, and the next leader finishes the job."""
    async with routed_with_own_reconciler(stack, scheduler, "midway", "192.168.7.34") as r:
        fw, tg, agent, pod_name, address = r.fw, r.tg, r.agent, r.pod_name, r.address
        first, first_scope = r.reconciler, r.scope
        routed = await stack.world.our_slice("midway")
        assert routed is not None
        ports = await listener_ports(fw, agent)
        entered = anyio.Event()

        async def stall(*_args: Any) -> None:
            entered.set()
            await anyio.sleep_forever()

        first._route_workers = stall  # type: ignore[method-assign]
        await dask_operator.scale(stack.ns, "midway", 2)  # a reconcile that must reach workers
        with anyio.fail_after(DEADLINE):
            await entered.wait()
        first_scope.cancel()
        # Nobody leads now: the route stays exactly as it was.
        kept = await stack.world.our_slice("midway")
        assert kept is not None
        assert kept["metadata"]["uid"] == routed["metadata"]["uid"]
        assert await endpoints_are(stack, "midway", ports)

        _, second_scope = await start_reconciler(tg, stack.settings(), stack.kube)
        await wait_for(
            lambda: workers_point_at(stack, "midway", address, 2),
            DEADLINE,
            "the next leader finishes the interrupted reconcile",
        )
        assert await fully_routed(stack, fw, agent, "midway", pod_name)
        after = await stack.world.our_slice("midway")
        assert after is not None
        assert after["metadata"]["uid"] == routed["metadata"]["uid"]
        second_scope.cancel()


async def test_forwarder_pod_deleted(stack: Stack, scheduler: Scheduler) -> None:
    """The forwarder pod goes: the garbage collector deletes its Tunnels, their slices go."""
    pods = {name: await stack.cluster(name, "alice") for name in ("gc1", "gc2")}
    before = {name: await stack.world.service(name) for name in pods}
    async with (
        stack.forwarder() as fw,
        stack.reconciler(),
        contextlib.AsyncExitStack() as agents,
    ):
        # No reconnect within the test: a dead pod's forwarder is gone with it.
        sessions = {
            name: await agents.enter_async_context(
                stack.agent(fw, scheduler, pod, backoff_initial=600.0, backoff_max=600.0)
            )
            for name, pod in pods.items()
        }
        for name, session in sessions.items():
            await wait_for(
                lambda name=name, session=session: fully_routed(
                    stack, fw, session, name, str(pods[name].metadata.name)
                ),
                DEADLINE,
                f"{name} routed",
            )
        tunnel_names = []
        for session in sessions.values():
            tunnel = await stack.tunnel_of(session)
            assert tunnel is not None
            assert tunnel["metadata"]["ownerReferences"][0]["uid"] == stack.forwarder_uid
            tunnel_names.append(tunnel["metadata"]["name"])

        await call_json(
            stack.core.delete_namespaced_pod, FORWARDER_POD, stack.fwd_ns, grace_period_seconds=0
        )

        async def collected() -> bool:
            for name in tunnel_names:
                if await stack.world.get_tunnel(name) is not None:
                    return False
            for name, original in before.items():
                if original_spec(await stack.world.service(name)) != original_spec(original):
                    return False
                if not await unrouted(stack, name):
                    return False
            return True

        await wait_for(collected, GC_DEADLINE, "Tunnels garbage-collected and slices deleted")
        await stack.vk.next_loops(2)
        for name, pod in pods.items():
            conditions = await stack.world.pod_conditions(str(pod.metadata.name))
            assert conditions.get("ContainersReady") != "True", name


async def test_scheduler_pod_replaced(
    stack: Stack,
    scheduler: Scheduler,
    dask_operator: DaskOperator,  # noqa: F811
) -> None:
    """The job is lost: the Deployment makes a new pod (new name and UID), a new agent claims
    it; the new session is routed and the old one's state cleaned without undoing the new."""
    old = await stack.cluster("phoenix", "alice")
    before = await stack.world.service("phoenix")
    async with (
        stack.forwarder() as fw,
        stack.reconciler(),
        stack.agent(fw, scheduler, old, private_ip="192.168.7.41") as old_agent,
    ):
        await wait_for(
            lambda: fully_routed(stack, fw, old_agent, "phoenix", str(old.metadata.name)),
            DEADLINE,
            "the old session routed",
        )
        old_tunnel = await stack.tunnel_of(old_agent)
        assert old_tunnel is not None
        await call_json(
            stack.core.delete_namespaced_pod,
            old.metadata.name,
            stack.ns,
            grace_period_seconds=0,
        )
        new = await dask_operator.run_pod(stack.ns, "phoenix-scheduler")
        assert (new.metadata.name, new.metadata.uid) != (old.metadata.name, old.metadata.uid)
        async with stack.agent(fw, scheduler, new, private_ip="192.168.7.42") as new_agent:
            await wait_for(
                lambda: fully_routed(stack, fw, new_agent, "phoenix", str(new.metadata.name)),
                DEADLINE,
                "the new session routed",
            )

            async def old_refused() -> bool:
                cond = await stack.tunnel_condition(old_agent, "Verified")
                return bool(cond and cond["reason"] == "PodNotFound")

            await wait_for(old_refused, DEADLINE, "the old Tunnel refused (its pod is gone)")
            address = f"tcp://192.168.7.42:{scheduler.port}"
            await wait_for(
                lambda: workers_point_at(stack, "phoenix", address, 1),
                DEADLINE,
                "workers pointed at the new private IP",
            )
            assert await stack.kr8s_ready(str(new.metadata.name), "phoenix") == (True, True)

            # The old agent leaves: its Tunnel goes, and its cleanup undoes nothing of the new.
            await old_agent.bye("job lost")
            await wait_for(
                lambda: _tunnel_gone(stack, old_tunnel["metadata"]["name"]),
                DEADLINE,
                "the old Tunnel gone",
            )
            ports = await listener_ports(fw, new_agent)
            # Let the reconciler see the deletion (a reconcile of the old key), then check.
            await wait_for(
                lambda: fully_routed(stack, fw, new_agent, "phoenix", str(new.metadata.name)),
                DEADLINE,
                "still routed to the new session",
            )
            ours = await stack.world.our_slice("phoenix")
            assert ours is not None
            by = json.loads(ours["metadata"]["annotations"]["jobtunnel.io/routed-by"])
            assert by["pod"]["uid"] == str(new.metadata.uid)
            assert await endpoints_are(stack, "phoenix", ports)
            assert await workers_point_at(stack, "phoenix", address, 1)
            assert original_spec(await stack.world.service("phoenix")) == original_spec(before)

        await wait_for(lambda: unrouted(stack, "phoenix"), DEADLINE, "unrouted after both")
        assert original_spec(await stack.world.service("phoenix")) == original_spec(before)


async def _tunnel_gone(stack: Stack, name: str) -> bool:
    return await stack.world.get_tunnel(name) is None


async def running_pod(stack: Stack, ns: str, name: str, ip: str, labels: dict[str, str]) -> None:
    """A pod "running" at ``ip`` on an ordinary node (a loopback alias stands for its IP)."""
    await call_json(
        stack.core.create_namespaced_pod,
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "busybox"}]},
        },
    )
    await call_json(
        stack.core.patch_namespaced_pod_status,
        name,
        ns,
        {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
        _content_type="application/strategic-merge-patch+json",
    )


async def dask_handshake(port: int, source: str) -> bytes:
    """Connect to the listener from ``source``: a real scheduler speaks first (its handshake);
    a refused peer reads EOF and nothing else."""
    got = b""
    with anyio.fail_after(DEADLINE):
        async with await anyio.connect_tcp("127.0.0.1", port, local_host=source) as stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while len(got) < 8:
                    got += await stream.receive()
    return got


async def test_only_the_owners_pods_and_the_operator_reach_the_scheduler(
    stack: Stack, scheduler: Scheduler
) -> None:
    """The reconciler writes who may connect (alice's pods, the operator's) into the Tunnel;
    the forwarder refuses bob's pod before a byte reaches the job, reports it in the Tunnel,
    and the reconciler tells alice with an Event on her DaskCluster."""
    pod = await stack.cluster("iso", "alice")
    notebook, bobs, operator = "127.0.7.2", "127.0.7.3", "127.0.7.4"
    await running_pod(stack, stack.ns, "jupyter-alice", notebook, {USER_LABEL: "alice"})
    await running_pod(stack, stack.ns, "jupyter-bob", bobs, {USER_LABEL: "bob"})
    await running_pod(
        stack,
        stack.fwd_ns,
        "dask-operator",
        operator,
        {"app.kubernetes.io/name": "dask-kubernetes-operator"},
    )
    # Only the loopback address itself is the forwarder's own: the aliases are "pods".
    async with (
        stack.forwarder(allowed_sources=("127.0.0.1/32",)) as fw,
        stack.reconciler(),
        stack.agent(fw, scheduler, pod) as session,
    ):

        async def allowed() -> list[str]:
            tunnel = await stack.tunnel_of(session)
            return list(((tunnel or {}).get("status") or {}).get("allowedSources") or [])

        async def lists_alice() -> bool:
            return f"{notebook}/32" in await allowed()

        since = anyio.current_time()
        await wait_for(lists_alice, DEADLINE, "the allow-list in the Tunnel")
        print(f"\nallow-list in the Tunnel {anyio.current_time() - since:.3f} s after publish")
        got = set(await allowed())
        assert {f"{notebook}/32", f"{operator}/32"} <= got
        assert f"{bobs}/32" not in got
        ports = await listener_ports(fw, session)
        port = ports["scheduler"]
        tunnel = await stack.tunnel_of(session)
        assert tunnel is not None
        # The same list at the network layer: the Tunnel's own NetworkPolicy.
        net = client.NetworkingV1Api(stack.api)
        name = tunnel["metadata"]["name"]

        async def has_policy() -> bool:
            found = await get_or_none(net.read_namespaced_network_policy, name, stack.fwd_ns)
            return found is not None

        await wait_for(has_policy, DEADLINE, "the Tunnel's NetworkPolicy")
        netpol = await call_json(net.read_namespaced_network_policy, name, stack.fwd_ns)
        assert netpol["spec"]["podSelector"] == {
            "matchLabels": {"jobtunnel.io/forwarder-pod": FORWARDER_POD}
        }
        (rule,) = netpol["spec"]["ingress"]
        assert sorted(p["port"] for p in rule["ports"]) == sorted(ports.values())
        owner = {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": stack.ns}},
            "podSelector": {
                "matchExpressions": [{"key": USER_LABEL, "operator": "In", "values": ["alice"]}]
            },
        }
        assert owner in rule["from"]
        assert netpol["metadata"]["ownerReferences"][0]["uid"] == tunnel["metadata"]["uid"]

        assert await dask_handshake(port, notebook) != b""
        assert await dask_handshake(port, operator) != b""
        assert await dask_handshake(port, bobs) == b""

        async def reported() -> bool:
            status = (await stack.tunnel_of(session) or {}).get("status") or {}
            return bobs in (status.get("reportedRefusals") or [])

        await wait_for(reported, DEADLINE, "bob's pod reported in the Tunnel")
        await wait_for(
            lambda: _has_reason(stack, "DaskCluster", "iso", "SourceRefused"),
            DEADLINE,
            "a SourceRefused Event on alice's DaskCluster",
        )
        (event,) = [
            e
            for e in await stack.world.events_for("DaskCluster", "iso")
            if e["reason"] == "SourceRefused"
        ]
        assert bobs in event["message"]
        assert event["type"] == "Warning"
        # Again from bob's pod: counted, no second Event for the same peer.
        assert await dask_handshake(port, bobs) == b""
        status = (await stack.tunnel_of(session) or {}).get("status") or {}
        assert [r["address"] for r in status.get("refusedSources") or []] == [bobs]

        # Level-triggered: alice's notebook pod goes, so does its address.
        await call_json(
            stack.core.delete_namespaced_pod, "jupyter-alice", stack.ns, grace_period_seconds=0
        )

        async def forgotten() -> bool:
            return f"{notebook}/32" not in await allowed()

        await wait_for(forgotten, DEADLINE, "the deleted pod's address withdrawn")
        assert await dask_handshake(port, notebook) == b""

        async def refusal_events() -> list[str]:
            return [
                e["message"]
                for e in await stack.world.events_for("DaskCluster", "iso")
                if e["reason"] == "SourceRefused"
            ]

        async def both_told() -> bool:
            return len(await refusal_events()) == 2

        # One Event per refused peer: bob's pod (twice refused) once, the old address once.
        await wait_for(both_told, DEADLINE, "a second Event, for the withdrawn address")
        messages = await refusal_events()
        assert sum(bobs in m for m in messages) == 1
        assert sum(notebook in m for m in messages) == 1


async def test_a_stolen_token_cannot_take_a_live_tunnel_and_the_owner_is_told(
    stack: Stack, scheduler: Scheduler
) -> None:
    """Alice's job is live; someone with her token claims its pod from elsewhere: refused
    (``identity-held``), the route untouched, and an Event on alice's DaskCluster says so."""
    pod = await stack.cluster("held", "alice")
    pod_name = str(pod.metadata.name)
    async with (
        stack.forwarder() as fw,
        stack.reconciler(),
        stack.agent(fw, scheduler, pod) as victim,
    ):
        await wait_for(lambda: fully_routed(stack, fw, victim, "held", pod_name), DEADLINE, "up")
        routed = await stack.world.our_slice("held")
        assert routed is not None
        async with stack.agent(fw, scheduler, pod, published=False) as thief:
            await wait_for(
                lambda: _has_reason(stack, "DaskCluster", "held", "IdentityClaimRefused"),
                DEADLINE,
                "an IdentityClaimRefused Event on alice's DaskCluster",
            )
            assert thief.state.identity_conflicts >= 1
            assert not thief.state.published
        (event,) = [
            e
            for e in await stack.world.events_for("DaskCluster", "held")
            if e["reason"] == "IdentityClaimRefused"
        ]
        assert "revoke" in event["message"]
        assert event["type"] == "Warning"
        tunnel = await stack.tunnel_of(victim)
        assert tunnel is not None
        assert [c["address"] for c in tunnel["status"]["refusedClaims"]] == ["127.0.0.1"]
        assert await fully_routed(stack, fw, victim, "held", pod_name)
        kept = await stack.world.our_slice("held")
        assert kept is not None
        assert kept["metadata"]["uid"] == routed["metadata"]["uid"]
