"""The real Dask operator's autoscaler and retire path reach an offloaded scheduler through the
routed Service (issue 6), with ``/api/v1`` enabled and disabled, and kopf never retries.

The path of every request the operator makes, all real except the two stand-ins marked *::

    operator (kopf) --*DNS--> <cluster>-scheduler.<ns>:8787 (or :8786)
        --*kube-proxy--> the Service's EndpointSlices (the reconciler's: forwarder pod IP, port)
        --> forwarder listener --SSH--> agent --> real ``dask scheduler``

- *DNS*: the operator runs in a private mount namespace whose ``/etc/hosts`` (a bind-mounted copy
  of the machine's, :class:`HostsFile`) maps ``<cluster>-scheduler.<ns>`` (and the ``.svc``,
  ``.svc.cluster.local`` forms) to a loopback alias; the machine's ``/etc/hosts`` is untouched.
  Needs root (mount namespaces); skipped with the reason otherwise.
- *kube-proxy*: :class:`tests.fakes.kube_proxy.FakeKubeProxy` listens on that alias at the
  Service ports and relays each connection to the Service's current ready endpoints, read from
  the API as kube-proxy reads them (every EndpointSlice with the Service's name label: the
  reconciler's and the EndpointSlice controller's); see its module for the translation of the
  forwarder pod's fake IP to 127.0.0.1.

The operator here is a dedicated instance started with the hosts file: the session's operator
(``dask_operator``) is stopped for this module, so that two operators never handle one
DaskCluster, and started again afterwards.

Real ``dask worker`` processes named after the operator's worker Deployments (as the operator's
worker pods name themselves, ``--name $(DASK_WORKER_NAME)``) join the scheduler directly: without
workers the scheduler retires nobody and the operator deletes no Deployment.

Timings measured on the 2-core test machine: each test 53-62 s, most of it the operator's own
clock (three autoscaler periods of 5 s before the scale-down, its 15 s cooldown and three more
periods after, and ~10 s waiting for the autoscaler's timer to stop); the module 130-160 s alone
(control plane included), up to ~270 s on a loaded machine.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import dask
import pytest
from kubernetes_asyncio import client

from daemons.reconciler.kube import call_json
from tests.dask_operator import (  # noqa: F401  (dask_operator: the fixture ours stops)
    VIRTUAL_NODE_SELECTOR,
    VIRTUAL_NODE_TOLERATIONS,
    DaskOperator,
    cluster_spec,
    dask_operator,
)
from tests.fakes.kube_proxy import FakeKubeProxy, running_kube_proxy
from tests.harness import (
    Process,
    base_env,
    dask_scheduler_argv,
    dask_worker_argv,
    free_port,
    http_get,
    wait_for_sync,
)
from tests.kube import KubeAPIServer, kube_api  # noqa: F401
from tests.test_e2e_operator import (
    API_ROUTE,
    DEADLINE,
    DG,
    DV,
    Scheduler,
    Stack,
    fully_routed,
    listener_ports,
    make_stack,
    tunnels_json,
    wait_for,
)
from tests.test_reconciler_kube import USER_LABEL, apply_crds, original_spec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

#: The operator's autoscaler timer period (``@kopf.timer(..., interval=5.0)``).
PERIOD = 5.0
#: Service ports of the scheduler Service as the operator makes it.
COMM, DASHBOARD = 8786, 8787
#: What the operator logs when both the HTTP API and the RPC failed for a retire.
LIFO_FALLBACK = "falling back to LIFO scaling"


# -- the operator's DNS ------------------------------------------------------------------------


class HostsFile:
    """The operator's ``/etc/hosts``: a copy of the machine's, extended in place (same inode, so
    the bind mount shows each change; glibc reads the file on every lookup)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text(Path("/etc/hosts").read_text())

    def add(self, ip: str, *names: str) -> None:
        with self.path.open("a") as f:
            f.write(f"{ip} {' '.join(names)}\n")


def mount_namespaces_work() -> str | None:
    """Why the operator cannot get a private ``/etc/hosts`` here, or None if it can."""
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    probe = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind /etc/hosts /etc/hosts",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"no private mount namespace for the operator: {probe.stderr.strip()}"
    return None


@dataclass
class RoutedOperator:
    operator: DaskOperator
    hosts: HostsFile


@pytest.fixture(scope="module")
def routed_operator(
    dask_operator: DaskOperator,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RoutedOperator]:
    """A dedicated operator resolving Service names through :class:`HostsFile`; the session's
    operator is stopped meanwhile and started again afterwards."""
    reason = mount_namespaces_work()
    if reason:
        pytest.skip(reason)
    kube = dask_operator.kube
    apply_crds(kube)
    tmp = tmp_path_factory.mktemp("routed-operator")
    hosts = HostsFile(tmp / "hosts")
    dask_operator.stop()
    operator = DaskOperator(kube, log_path=tmp / "dask-operator.log", hosts_file=hosts.path)
    try:
        operator.start()
        yield RoutedOperator(operator, hosts)
    finally:
        operator.stop()
        dask_operator.start()


# -- a scheduler, its workers, one test's namespace --------------------------------------------


@contextlib.contextmanager
def running_scheduler(tmp: Path, *, http_api: bool) -> Iterator[Scheduler]:
    """A real ``dask scheduler``; its HTTP routes with or without ``/api/v1``."""
    port, dashboard = free_port(), free_port()
    routes = [r for r in dask.config.get("distributed.scheduler.http.routes") if r != API_ROUTE]
    if http_api:
        routes.append(API_ROUTE)
    env = base_env()
    env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"] = repr(routes)
    proc = Process(dask_scheduler_argv(port, dashboard), tmp / "scheduler.log", env=env)
    try:

        def answers() -> bool:
            assert proc.proc.poll() is None, proc.log()
            try:
                return http_get(f"http://127.0.0.1:{dashboard}/health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for_sync(answers, DEADLINE, "the dask scheduler to answer")
        yield Scheduler(port, dashboard)
    finally:
        proc.stop()


def worker_names(scheduler: Scheduler) -> set[str]:
    """Names of the workers the scheduler has now (its own JSON route, not the API)."""
    status, body = http_get(f"http://127.0.0.1:{scheduler.dashboard}/json/identity.json", 5)
    assert status == 200, body
    return {str(w["name"]) for w in json.loads(body)["workers"].values()}


async def scheduler_workers(scheduler: Scheduler) -> set[str]:
    return await anyio.to_thread.run_sync(worker_names, scheduler)


@contextlib.asynccontextmanager
async def running_workers(tmp: Path, scheduler: Scheduler, names: list[str]) -> AsyncIterator[None]:
    """Real ``dask worker`` processes named as the operator names its worker pods."""
    with contextlib.ExitStack() as stack:
        for name in names:
            proc = Process(
                dask_worker_argv(f"tcp://127.0.0.1:{scheduler.port}", name),
                tmp / f"worker-{name}.log",
                env=base_env(),
            )
            stack.callback(proc.stop)

        async def joined() -> bool:
            return await scheduler_workers(scheduler) >= set(names)

        await wait_for(joined, DEADLINE, f"workers {names} to join")
        yield


def loopback_alias() -> str:
    """A fresh 127/8 address for one Service (random: a concurrent run picks another)."""
    return f"127.77.{random.randrange(1, 250)}.{random.randrange(2, 250)}"


@pytest.fixture
async def stack(
    routed_operator: RoutedOperator,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    operator = routed_operator.operator
    ip = f"10.246.{random.randrange(0, 250)}.{random.randrange(2, 250)}"
    async with make_stack(operator.kube, operator, tmp_path, "autoscale", ip) as made:
        yield made


# -- reads -------------------------------------------------------------------------------------


async def worker_deployments(stack: Stack, cluster: str) -> list[str]:
    deployments = await call_json(
        client.AppsV1Api(stack.api).list_namespaced_deployment,
        stack.ns,
        label_selector=f"dask.org/cluster-name={cluster},dask.org/component=worker",
    )
    return sorted(d["metadata"]["name"] for d in deployments.get("items") or [])


async def set_autoscaler(stack: Stack, cluster: str, n: int) -> None:
    """A DaskAutoscaler pinned to ``n`` workers (minimum = maximum), created or updated."""
    custom = client.CustomObjectsApi(stack.api)
    spec = {"cluster": cluster, "minimum": n, "maximum": n}
    existing = await call_json(
        custom.list_namespaced_custom_object, DG, DV, stack.ns, "daskautoscalers"
    )
    if not existing.get("items"):
        body = {
            "apiVersion": f"{DG}/{DV}",
            "kind": "DaskAutoscaler",
            "metadata": {"name": cluster},
            "spec": spec,
        }
        await call_json(
            custom.create_namespaced_custom_object, DG, DV, stack.ns, "daskautoscalers", body
        )
    else:
        await call_json(
            custom.patch_namespaced_custom_object,
            DG,
            DV,
            stack.ns,
            "daskautoscalers",
            cluster,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )


async def stop_autoscaler(stack: Stack, operator: DaskOperator, name: str) -> None:
    """Delete the DaskAutoscaler and wait until kopf stopped its timer.

    kopf stops a timer as soon as its object is being deleted, but may take a while to release
    its finalizer (seen: over 60 s on a loaded machine), so "gone" is no signal. The operator's
    own cluster timer (every 5 s) serves as the clock instead: three of its ticks after the
    deletion with no autoscaler tick between them.
    """
    custom = client.CustomObjectsApi(stack.api)
    await call_json(
        custom.delete_namespaced_custom_object, DG, DV, stack.ns, "daskautoscalers", name
    )
    mark = operator.log_offset()

    async def quiet() -> bool:
        text = operator.log()[mark:]
        ticks = [
            m.start() for m in re.finditer(r"Timer 'daskcluster_autoshutdown' succeeded", text)
        ]
        return any(
            "Timer 'daskautoscaler_adapt'" not in text[a:b]
            for a, b in zip(ticks, ticks[2:], strict=False)
        )

    await wait_for(quiet, DEADLINE, f"the timer of DaskAutoscaler {name} to stop")


def answered(proxy: FakeKubeProxy, method: str, path: str, status: str) -> int:
    """HTTP requests to the dashboard port through the proxy, answered with ``status``."""
    return sum(
        1
        for request, reply in proxy.requests(DASHBOARD)
        if request.startswith(f"{method} {path} ") and reply.split(" ")[1:2] == [status]
    )


def polls(proxy: FakeKubeProxy, status: str) -> int:
    """The autoscaler's polls (``GET /api/v1/adaptive_target``) answered with ``status``."""
    return answered(proxy, "GET", "/api/v1/adaptive_target", status)


async def _true(value: bool) -> bool:
    return value


async def _not_in(name: str, scheduler: Scheduler) -> bool:
    return name not in await scheduler_workers(scheduler)


# -- the test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("http_api", [True, False], ids=["api-v1", "no-api-v1"])
async def test_autoscaler_and_retire_reach_the_scheduler_through_the_service(
    stack: Stack,
    routed_operator: RoutedOperator,
    http_api: bool,
) -> None:
    """The autoscaler's polls, the idle check and a scale-down's retire reach the real scheduler
    through DNS, the (fake) kube-proxy, the routing EndpointSlice and the tunnel. With ``/api/v1``
    the HTTP calls succeed; without it each gets a 404 and the operator's RPC fallback on 8786
    takes the same path. The worker Deployments shrink to what the scheduler retired; kopf
    never fails or retries."""
    operator = routed_operator.operator
    cluster = "scaled"
    service = f"{cluster}-scheduler"
    alias = loopback_alias()
    routed_operator.hosts.add(
        alias,
        f"{service}.{stack.ns}",
        f"{service}.{stack.ns}.svc",
        f"{service}.{stack.ns}.svc.cluster.local",
    )
    answer = "200" if http_api else "404"
    since = operator.log_offset()
    body = cluster_spec(
        cluster,
        n_workers=2,
        scheduler_node_selector=VIRTUAL_NODE_SELECTOR,
        tolerations=VIRTUAL_NODE_TOLERATIONS,
        labels={USER_LABEL: "alice"},
    )
    await operator.create_cluster(stack.ns, cluster, body=body)
    await operator.wait_for_objects(stack.ns, cluster)
    pod = await operator.run_pod(stack.ns, service)
    pod_name = str(pod.metadata.name)
    workers = await worker_deployments(stack, cluster)
    assert len(workers) == 2
    translate = {stack.forwarder_ip: "127.0.0.1"}
    with running_scheduler(stack.tmp, http_api=http_api) as scheduler:
        async with running_kube_proxy(stack.api, stack.ns, service, alias, translate) as proxy:
            assert sorted(proxy.ports) == [COMM, DASHBOARD]
            # The autoscaler, pinned to the current count (it will only poll), before any
            # tunnel: the scheduler pod is Ready only, so the operator skips and dials nothing.
            await set_autoscaler(stack, cluster, 2)
            await wait_for(
                lambda: _true("Scheduler not ready, skipping" in operator.log()[since:]),
                DEADLINE,
                "the autoscaler to skip the unready scheduler",
            )
            assert proxy.connections == []

            async with (
                stack.forwarder() as fw,
                stack.reconciler(),
                stack.agent(fw, scheduler, pod, private_ip="192.168.7.51") as agent,
                running_workers(stack.tmp, scheduler, workers),
            ):
                await wait_for(
                    lambda: fully_routed(stack, fw, agent, cluster, pod_name), DEADLINE, "routed"
                )
                ports = await listener_ports(fw, agent)
                routed = operator.log_offset()
                # The idle check too (a timeout far away: it only asks).
                await call_json(
                    client.CustomObjectsApi(stack.api).patch_namespaced_custom_object,
                    DG,
                    DV,
                    stack.ns,
                    "daskclusters",
                    cluster,
                    {"spec": {"idleTimeout": 3600}},
                    _content_type="application/merge-patch+json",
                )

                def polled(n: int) -> bool:
                    return (
                        polls(proxy, answer) >= n
                        and answered(proxy, "GET", "/api/v1/check_idle", answer) >= 1
                        and (http_api or proxy.count(COMM) >= n)
                    )

                await wait_for(
                    lambda: _true(polled(3)),
                    DEADLINE,
                    f"three autoscaler polls and an idle check answered {answer}",
                )
                assert operator.problems(since) == [], operator.log()[since:]
                if http_api:
                    assert proxy.count(COMM) == 0, "RPC used although the HTTP API answered"
                rpc_before = proxy.count(COMM)

                # The autoscaler pinned to one: it scales the worker group down, and the
                # operator asks the scheduler which worker to retire.
                await set_autoscaler(stack, cluster, 1)

                async def shrunk() -> list[str] | None:
                    left = await worker_deployments(stack, cluster)
                    retired = answered(proxy, "POST", "/api/v1/retire_workers", answer)
                    return left if len(left) == 1 and retired >= 1 else None

                (kept,) = await wait_for(shrunk, DEADLINE, "one worker Deployment left")
                (removed,) = set(workers) - {kept}
                if not http_api:
                    assert proxy.count(COMM) > rpc_before, "no RPC fallback for the retire"
                # The scheduler chose the worker (not the operator's LIFO fallback).
                await wait_for(
                    lambda: _true(f"Workers to close: ['{removed}']" in operator.log()[since:]),
                    DEADLINE,
                    "the operator's log of the retired worker",
                )
                if http_api:
                    assert "Retired workers" in operator.log()[since:]
                await wait_for(lambda: _not_in(removed, scheduler), DEADLINE, f"{removed} retired")

                # Polling resumes after the autoscaler's 15 s cooldown; over three more
                # periods no handler or timer fails or retries.
                after = polls(proxy, answer)
                await wait_for(
                    lambda: _true(polls(proxy, answer) >= after + 3),
                    DEADLINE,
                    "three more polls after the scale-down",
                )
                assert await worker_deployments(stack, cluster) == [kept]

                # Quiet the autoscaler before the tunnel goes: leaving this block stops the
                # reconciler before it can unroute, so the pod would stay ready with nothing
                # behind it, and a poll would fail (the idle check only warns).
                await stop_autoscaler(stack, operator, cluster)
                await wait_for(
                    lambda: _true(all(c.done for c in proxy.connections)),
                    DEADLINE,
                    "the operator's last call through the proxy to end",
                )

                # While routed, every connection went to the routed endpoint (the forwarder
                # pod's listeners), and the operator never failed to reach the scheduler.
                # (Once unrouted, the idle check finds the scheduler pod's unreachable IP:
                # a warning by design, not a retry.)
                connections = list(proxy.connections)
                errors = list(proxy.errors)
                text = operator.log()[since:]
                routed_text = operator.log()[routed:]
        wanted = {f"{stack.forwarder_ip}:{ports['dashboard']}"}
        if not http_api:
            wanted.add(f"{stack.forwarder_ip}:{ports['scheduler']}")
        assert {c.endpoint for c in connections} == wanted
        assert all(c.relayed for c in connections)
        assert errors == []
    assert LIFO_FALLBACK not in text
    assert "Unable to connect to scheduler" not in routed_text
    # No handler or timer failed or retried, unrouting and the scheduler's exit included.
    assert operator.problems(since) == [], operator.log()[since:]
    operator.check_alive()


# -- a user's KubeCluster ----------------------------------------------------------------------

#: What a notebook runs, in a process of its own (a private mount namespace whose /etc/hosts is
#: the hosts file: cluster DNS for the Service name). kr8s gets the 1.20 discovery fill-in of
#: ``kr8s_discovery_as_in_supported_kubernetes``, nothing else.
USER_SCRIPT = """
import sys
from kr8s._api import Api

original = Api.async_api_resources_uncached


async def resources(self):
    found = await original(self)
    for resource in found:
        if not resource.get("singularName") and resource.get("kind"):
            resource["singularName"] = str(resource["kind"]).lower()
    return found


Api.async_api_resources_uncached = resources

from distributed import Client  # noqa: E402
from jobtunnel.dask import OffloadedKubeCluster  # noqa: E402

namespace, name, selector, taint = sys.argv[1:5]
cluster = OffloadedKubeCluster(
    name=name,
    namespace=namespace,
    image="ghcr.io/dask/dask:latest",
    forwarder="forwarder.example.org:31022",
    host_key_fingerprint="SHA256:" + "A" * 43,
    user="alice",
    create_token_secret=False,
    n_workers=1,
    node_selector=dict([selector.split("=", 1)]),
    tolerations=[{"key": taint, "operator": "Exists", "effect": "NoSchedule"}],
)
print("SCHEDULER", cluster.scheduler_address, flush=True)
with Client(cluster, timeout=60) as client:
    print("RESULT", client.submit(sum, [20, 22]).result(timeout=60), flush=True)
# Hold the cluster until the test has looked at it: close() deletes the DaskCluster and with it
# the Service the test compares.
import os, time  # noqa: E401, E402
deadline = time.monotonic() + 300
while not os.path.exists(sys.argv[5]) and time.monotonic() < deadline:
    time.sleep(0.05)
cluster.close()
print("CLOSED", flush=True)
"""


@pytest.fixture(params=["hub-namespace", "per-user-namespace"])
async def layout_stack(
    request: pytest.FixtureRequest, routed_operator: RoutedOperator, tmp_path: Path
) -> AsyncIterator[Stack]:
    """Both layouts KubeSpawner offers: users in the hub's namespace (told apart by label), or
    each in ``<prefix>-{user}`` (``jupyter-alice``); the forwarder in its own either way."""
    operator = routed_operator.operator
    ip = f"10.246.{random.randrange(0, 250)}.{random.randrange(2, 250)}"
    async with make_stack(
        operator.kube,
        operator,
        tmp_path,
        "kc",
        ip,
        per_user_namespace=request.param == "per-user-namespace",
    ) as made:
        yield made


async def test_kubecluster_from_the_user_helper_computes_through_the_tunnel(
    layout_stack: Stack,
    routed_operator: RoutedOperator,
) -> None:
    """``OffloadedKubeCluster(...)`` as a notebook runs it: it creates the DaskCluster, waits as
    kr8s does for the scheduler pod (the fake virtual kubelet wiping ContainersReady all along),
    dials ``tcp://<cluster>-scheduler.<ns>:8786`` (DNS, the fake kube-proxy, the reconciler's
    EndpointSlice, the forwarder, SSH, the agent, a real ``dask scheduler``) and computes on a
    real worker; the operator's Service is never modified."""
    stack = layout_stack
    operator = routed_operator.operator
    cluster = "kc"
    service = f"{cluster}-scheduler"
    alias = loopback_alias()
    routed_operator.hosts.add(
        alias,
        f"{service}.{stack.ns}",
        f"{service}.{stack.ns}.svc",
        f"{service}.{stack.ns}.svc.cluster.local",
    )
    env = base_env()
    env["KUBECONFIG"] = str(stack.kube.kubeconfig)
    mount = 'mount --bind "$0" /etc/hosts && exec "$@"'
    (selector,) = [f"{k}={v}" for k, v in VIRTUAL_NODE_SELECTOR.items()]
    argv = [
        *("unshare", "--mount", "--propagation", "private", "sh", "-c", mount),
        str(routed_operator.hosts.path),
        sys.executable,
        "-c",
        USER_SCRIPT,
        stack.ns,
        cluster,
        selector,
        VIRTUAL_NODE_TOLERATIONS[0]["key"],
        str(release := stack.tmp / "release-cluster"),
    ]
    with running_scheduler(stack.tmp, http_api=True) as scheduler:
        async with stack.forwarder() as fw, stack.reconciler():
            user = Process(argv, stack.tmp / "user.log", env=env)
            try:
                # kube-scheduler's part: bind the pod the operator's Deployment makes.
                async def made() -> bool:
                    assert user.proc.poll() in (None, 0), user.log()
                    found = await call_json(
                        client.AppsV1Api(stack.api).list_namespaced_deployment,
                        stack.ns,
                        label_selector=f"dask.org/cluster-name={cluster}",
                    )
                    names = {d["metadata"]["name"] for d in found.get("items") or []}
                    return service in names

                await wait_for(made, 2 * DEADLINE, "KubeCluster's DaskCluster and Deployment")
                # InterLink's pod IP from the first status on (the fake virtual kubelet writes the
                # same): a routable one would give the EndpointSlice controller a dead endpoint.
                pod = await operator.run_pod(stack.ns, service, pod_ip="127.0.0.1")
                before = await stack.world.service(cluster)
                translate = {stack.forwarder_ip: "127.0.0.1"}
                async with (
                    running_kube_proxy(stack.api, stack.ns, service, alias, translate) as proxy,
                    stack.agent(fw, scheduler, pod, private_ip="127.0.0.1"),
                    running_workers(stack.tmp, scheduler, ["kc-worker"]),
                ):

                    def done() -> bool:
                        assert user.proc.poll() in (None, 0), user.log()
                        return "RESULT 42" in user.log()

                    await wait_for(lambda: _true(done()), 3 * DEADLINE, "KubeCluster computes")
                    assert f"SCHEDULER tcp://{service}.{stack.ns}:{COMM}" in user.log()
                    assert proxy.count(COMM) >= 1
                    listeners = {
                        f"{stack.forwarder_ip}:{str(address).rpartition(':')[2]}"
                        for entry in await tunnels_json(fw)
                        for address in entry["services"].values()
                    }
                    assert {c.endpoint for c in proxy.connections if c.relayed} <= listeners
                    assert original_spec(await stack.world.service(cluster)) == original_spec(
                        before
                    )
                    assert stack.vk.loops >= 2
                    release.touch()

                    def closed() -> bool:
                        assert user.proc.poll() in (None, 0), user.log()
                        return "CLOSED" in user.log()

                    await wait_for(lambda: _true(closed()), DEADLINE, "KubeCluster closes")
            finally:
                user.stop()
