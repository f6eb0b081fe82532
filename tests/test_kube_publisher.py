"""The Kubernetes publisher against a real API server: Tunnel objects follow the sessions.

Real forwarder, real agents, real kube-apiserver + controller-manager (``tests/kube.py``). Nothing
runs pods here: the "forwarder pod" is an object whose status the test writes, the forwarder
itself runs in this process with :class:`KubernetesPublisher` configured as that pod.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from anyio.abc import SocketStream
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from daemons.agent.session import AgentIdentity
from daemons.forwarder.__main__ import effective
from daemons.forwarder.kube import (
    LABEL_FORWARDER_POD,
    LABEL_IDENTITY_HASH,
    LABEL_USER,
    KubeConfigError,
    KubernetesPublisher,
    create_api_client,
    iso_time,
    tunnel_name,
)
from daemons.forwarder.sessions import Session
from shared import protocol as p
from shared.config import ConfigError, HostPort
from tests.harness import (
    RunningForwarder,
    agent_settings,
    forwarder_settings,
    running_agent,
    running_forwarder,
    wait_for,
    write_token_file,
)
from tests.kube import KubeAPIServer, kube_api  # noqa: F401
from tests.test_tunnel import echo_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = ROOT / "configs" / "kubernetes" / "crd-tunnels.yaml"
RBAC_FILE = ROOT / "configs" / "kubernetes" / "rbac-forwarder.yaml"
GROUP, VERSION, PLURAL = "jobtunnel.io", "v1alpha1", "tunnels"
POD_IP = "10.244.1.10"
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
MERGE = "application/merge-patch+json"
#: The garbage collector only watches a new CRD's objects after its discovery resync (30 s).
GC_DEADLINE = 120.0


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tunnel_crd(kube_api: KubeAPIServer) -> str:  # noqa: F811
    """The Tunnel CRD from configs/, installed once per session (cluster-scoped)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    status, body = kube_api.request("POST", path, crd)
    if status == 409:  # someone else installed it: make sure it is the file's version
        status, current = kube_api.request("GET", f"{path}/{crd['metadata']['name']}")
        assert status == 200, current
        crd["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        status, body = kube_api.request("PUT", f"{path}/{crd['metadata']['name']}", crd)
    assert status in (200, 201), body

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, current = kube_api.request("GET", f"{path}/{crd['metadata']['name']}")
        conditions = (current.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return str(crd["metadata"]["name"])
        time.sleep(0.1)  # sync fixture, no event loop to await on
    raise AssertionError("the Tunnel CRD was not Established within 30s")


async def client_for(kubeconfig: Path) -> client.ApiClient:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture
async def api(kube_api: KubeAPIServer, tunnel_crd: str) -> AsyncIterator[client.ApiClient]:  # noqa: F811
    async with await client_for(kube_api.kubeconfig) as api_client:
        yield api_client


@pytest.fixture
async def namespace(api: client.ApiClient) -> AsyncIterator[str]:
    name = f"jt-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    with anyio.CancelScope(shield=True):
        await core.delete_namespace(name)


async def create_forwarder_pod(
    api: client.ApiClient, namespace: str, name: str, ip: str = POD_IP
) -> str:
    """A pod object standing for a forwarder replica, Running and Ready as a kubelet would say."""
    core = client.CoreV1Api(api)
    pod = await core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(
                name=name, labels={"app.kubernetes.io/name": "jobtunnel-forwarder"}
            ),
            spec=client.V1PodSpec(
                node_name="fake-node",
                containers=[client.V1Container(name="forwarder", image="jobtunnel:test")],
            ),
        ),
    )
    await core.patch_namespaced_pod_status(
        name,
        namespace,
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
    )
    return str(pod.metadata.uid)


@pytest.fixture
async def forwarder_pod(api: client.ApiClient, namespace: str) -> tuple[str, str]:
    name = "jobtunnel-forwarder-7d9f8-abcde"
    return name, await create_forwarder_pod(api, namespace, name)


def make_publisher(
    api: client.ApiClient,
    namespace: str,
    pod_name: str,
    *,
    pod_ip: str = POD_IP,
    heartbeat_interval: float = 30.0,
) -> KubernetesPublisher:
    return KubernetesPublisher(
        api,
        namespace=namespace,
        pod_name=pod_name,
        pod_ip=pod_ip,
        heartbeat_interval=heartbeat_interval,
        registry=CollectorRegistry(),
        request_timeout=10.0,
        backoff_max=1.0,
    )


@dataclass
class Env:
    tmp: Path
    api: client.ApiClient
    namespace: str
    pod_name: str
    pod_uid: str

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    async def tunnels(self) -> list[dict[str, Any]]:
        result = await self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL
        )
        return list(result["items"])

    async def tunnel(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    async def tunnel_for(self, session_id: str | None) -> dict[str, Any] | None:
        for item in await self.tunnels():
            if item["spec"]["sessionId"] == session_id:
                return item
        return None

    @contextlib.asynccontextmanager
    async def forwarder(
        self, publisher: KubernetesPublisher, **settings: Any
    ) -> AsyncIterator[RunningForwarder]:
        settings.setdefault("advertise_host", POD_IP)
        async with running_forwarder(
            forwarder_settings(self.tmp, **settings), publisher=publisher
        ) as fw:
            yield fw


@pytest.fixture
def env(
    tmp_path: Path, api: client.ApiClient, namespace: str, forwarder_pod: tuple[str, str]
) -> Env:
    write_token_file(tmp_path / "tokens", TOKENS)
    return Env(tmp_path, api, namespace, *forwarder_pod)


def pod_identity(uid: str | None = None, **extra: Any) -> AgentIdentity:
    return AgentIdentity(
        instance_id=uuid.uuid4().hex,
        private_ip="10.1.2.3",
        pod=p.PodInfo(
            namespace="dask-alice", name="dask-alice-scheduler", uid=uid or str(uuid.uuid4())
        ),
        **extra,
    )


def counter(publisher: KubernetesPublisher, name: str, **labels: str) -> float:
    return publisher.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def freezable_proxy(target: HostPort) -> AsyncIterator[tuple[HostPort, anyio.Event]]:
    """A TCP relay to ``target``; setting the event freezes it: a silent network loss.

    Once frozen, nothing more is relayed in either direction and the connections stay open
    (no FIN, no RST), and new connections are closed at once, so only timeouts notice.
    """
    frozen = anyio.Event()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def pump(source: SocketStream, sink: SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            while True:
                data = await source.receive()
                if frozen.is_set():
                    await anyio.sleep_forever()
                await sink.send(data)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            if frozen.is_set():
                return
            async with (
                await anyio.connect_tcp(target.host, target.port) as upstream,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(pump, stream, upstream)
                await pump(upstream, stream)
                if not frozen.is_set():
                    tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        try:
            yield HostPort("127.0.0.1", port), frozen
        finally:
            tg.cancel_scope.cancel()


def fake_session(user: str, identity: tuple[str, str] | None, sid: str = "s1") -> Session:
    return Session(id=sid, user=user, peer="x", mode="agent", identity=identity)


# -- pure helpers --------------------------------------------------------------------------------


async def test_allow_list_unknown_until_the_reconciler_writes_it() -> None:
    """None (not yet: counted as source-pending, not reported) until status.allowedSources
    exists; then exactly its CIDRs; another user's Tunnel under the name admits nobody."""
    async with client.ApiClient() as unused:
        pub = make_publisher(unused, "jobtunnel", "fwd-0")
        session = fake_session("alice", ("alice", "pod:u1"))
        name = tunnel_name(session)
        assert pub.admits_source(session, "10.0.0.5") is None
        tunnel: dict[str, Any] = {
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"user": "alice"},
            "status": {},
        }
        pub._observe(tunnel)
        assert pub.admits_source(session, "10.0.0.5") is None
        tunnel = copy.deepcopy(tunnel)
        tunnel["metadata"]["resourceVersion"] = "2"
        tunnel["status"]["allowedSources"] = ["10.0.0.5/32", "not-a-cidr"]
        pub._observe(tunnel)
        assert pub.admits_source(session, "10.0.0.5") is True
        assert pub.admits_source(session, "10.0.0.6") is False
        assert pub.admits_source(fake_session("bob", ("alice", "pod:u1")), "10.0.0.5") is None


def test_tunnel_names_are_dns_labels_and_stable_per_identity() -> None:
    a = fake_session("Alice.Smith@EXAMPLE.org", ("Alice.Smith@EXAMPLE.org", "pod:1"), "s1")
    b = fake_session("Alice.Smith@EXAMPLE.org", ("Alice.Smith@EXAMPLE.org", "pod:1"), "s2")
    c = fake_session("Alice.Smith@EXAMPLE.org", ("Alice.Smith@EXAMPLE.org", "pod:2"), "s3")
    assert tunnel_name(a) == tunnel_name(b) != tunnel_name(c)
    assert tunnel_name(a).startswith("alice-smith-example-org-")
    long = fake_session("x" * 200, None, "s4")
    name = tunnel_name(long)
    assert len(name) <= 63
    assert name[0].isalnum()
    assert name[-1].isalnum()
    assert tunnel_name(fake_session("___", None)).startswith("user-")
    # Plain SSH sessions (no identity) get one Tunnel per session.
    assert tunnel_name(fake_session("bob", None, "a")) != tunnel_name(
        fake_session("bob", None, "b")
    )


def test_kubernetes_mode_requires_pod_settings(tmp_path: Path) -> None:
    base = forwarder_settings(tmp_path, publish="kubernetes")
    with pytest.raises(ConfigError, match="JOBTUNNEL_NAMESPACE"):
        base.check()
    complete = dataclasses.replace(base, namespace="ns", pod_name="fw-0", pod_ip=POD_IP)
    complete.check()
    assert effective(complete).advertise_host == POD_IP
    assert effective(dataclasses.replace(complete, advertise_host="x")).advertise_host == "x"
    assert effective(base.__class__()).advertise_host is None  # memory mode: unchanged


async def test_client_factory_honours_kubeconfig(
    kube_api: KubeAPIServer,  # noqa: F811
    tunnel_crd: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig))
    async with await create_api_client() as api:
        crd = await client.ApiextensionsV1Api(api).read_custom_resource_definition(tunnel_crd)
        assert crd.spec.group == GROUP
    # Neither KUBECONFIG nor a service account mounted: one clear error.
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="in-cluster"):
        await create_api_client()


# -- against the API server ----------------------------------------------------------------------


async def test_ready_session_creates_one_tunnel(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    job = p.JobInfo(
        global_job_id="schedd.example#12.0#1700000000",
        cluster_id=12,
        proc_id=0,
        schedd="schedd.example",
    )
    pod_uid = str(uuid.uuid4())
    published_at: dict[str, float] = {}
    publish = publisher.publish

    async def timed_publish(session: Session) -> None:
        published_at[session.id] = time.monotonic()
        await publish(session)

    publisher.publish = timed_publish  # type: ignore[method-assign]
    async with (
        echo_server() as sched_port,
        echo_server() as dash_port,
        env.forwarder(publisher) as fw,
    ):
        await wait_for(lambda: publisher.ready_check() is None, what="publisher synced")
        assert fw.forwarder.ready_check() is None
        async with running_agent(
            agent_settings(fw, services=(("scheduler", sched_port), ("dashboard", dash_port))),
            pod_identity(pod_uid, job=job),
        ) as agent:
            tunnel = await wait_for(
                lambda: env.tunnel_for(agent.state.session_id),
                what="the Tunnel",
                interval=0.01,
            )
            latency = time.monotonic() - published_at[str(agent.state.session_id)]
            print(f"publish -> Tunnel visible: {latency * 1000:.0f} ms")

            tunnels = await env.tunnels()
            assert len(tunnels) == 1
            (session,) = fw.forwarder.registry.published()
            listeners = {name: fwd.port for name, fwd in session.forwards.items()}
            assert tunnel["metadata"]["name"] == tunnel_name(session)
            assert tunnel["spec"] == {
                "sessionId": agent.state.session_id,
                "user": "alice",
                "identity": f"pod:{pod_uid}",
                "mode": "agent",
                "forwarder": {"podName": env.pod_name, "podIP": POD_IP},
                "pod": {"namespace": "dask-alice", "name": "dask-alice-scheduler", "uid": pod_uid},
                "job": {
                    "globalJobId": "schedd.example#12.0#1700000000",
                    "clusterId": 12,
                    "procId": 0,
                    "schedd": "schedd.example",
                },
                "privateIP": "10.1.2.3",
                "services": [
                    {"name": "dashboard", "port": listeners["dashboard"], "remotePort": dash_port},
                    {"name": "scheduler", "port": listeners["scheduler"], "remotePort": sched_port},
                ],
                "since": tunnel["spec"]["since"],
            }
            assert tunnel["spec"]["since"].endswith("Z")
            # The agent was told the same addresses the Tunnel publishes.
            assert agent.state.addresses == {
                s["name"]: f"{POD_IP}:{s['port']}" for s in tunnel["spec"]["services"]
            }
            meta = tunnel["metadata"]
            assert meta["labels"] == {
                LABEL_FORWARDER_POD: env.pod_name,
                LABEL_USER: "alice",
                LABEL_IDENTITY_HASH: meta["name"].rsplit("-", 1)[1],
            }
            assert meta["ownerReferences"] == [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": env.pod_name,
                    "uid": env.pod_uid,
                    "controller": False,
                    "blockOwnerDeletion": False,
                }
            ]
            # The status subresource carries the heartbeat from the start.
            await wait_for(
                lambda: _status_heartbeat(env, meta["name"]), what="status.lastHeartbeat"
            )
            # Nothing secret in there.
            raw = json.dumps(await env.tunnel(meta["name"]))
            for token in TOKENS.values():
                assert token not in raw

            # The forwarder labelled its own pod, and nothing else.
            pod = await client.CoreV1Api(env.api).read_namespaced_pod(env.pod_name, env.namespace)
            assert pod.metadata.labels == {
                "app.kubernetes.io/name": "jobtunnel-forwarder",
                LABEL_FORWARDER_POD: env.pod_name,
            }
            assert not any(k.startswith("dask.org/") for k in pod.metadata.labels)
            assert publisher.pod_uid == env.pod_uid

    crd = await client.ApiextensionsV1Api(env.api).read_custom_resource_definition(
        "tunnels.jobtunnel.io"
    )
    columns = {c.name: c.json_path for c in crd.spec.versions[0].additional_printer_columns}
    assert columns["User"] == ".spec.user"
    assert columns["Forwarder"] == ".spec.forwarder.podName"
    assert "Routed" in columns
    assert "Age" in columns


async def _status_heartbeat(env: Env, name: str) -> str | None:
    obj = await env.tunnel(name)
    if obj is None:
        return None
    value: str | None = (obj.get("status") or {}).get("lastHeartbeat")
    return value


async def test_bye_and_network_loss_delete_the_tunnel(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    async with (
        echo_server() as port,
        env.forwarder(publisher, heartbeat_interval=0.5) as fw,
    ):
        # A graceful end: bye.
        async with running_agent(
            agent_settings(fw, services=(("scheduler", port),)), pod_identity()
        ) as agent:
            tunnel = await wait_for(lambda: env.tunnel_for(agent.state.session_id), what="Tunnel")
            with anyio.fail_after(20):
                await agent.bye("job done")
                await wait_for(lambda: _gone(env, tunnel), what="Tunnel deleted after bye")

        # A silent network loss: the forwarder's heartbeat deadline (1.5 s) ends the session.
        async with (
            freezable_proxy(fw.ssh) as (proxy, frozen),
            running_agent(
                agent_settings(proxy, fw.fingerprint, services=(("scheduler", port),)),
                pod_identity(),
            ) as agent,
        ):
            tunnel = await wait_for(lambda: env.tunnel_for(agent.state.session_id), what="Tunnel")
            frozen.set()
            await wait_for(lambda: _gone(env, tunnel), what="Tunnel deleted after network loss")
            assert fw.forwarder.registry.published() == []
        assert counter(publisher, "jobtunnel_forwarder_tunnel_syncs_total", operation="delete") == 2


async def _gone(env: Env, tunnel: dict[str, Any]) -> bool:
    current = await env.tunnel(tunnel["metadata"]["name"])
    return current is None or current["metadata"]["uid"] != tunnel["metadata"]["uid"]


async def test_deleting_the_tunnel_ends_the_session(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    async with (
        echo_server() as port,
        env.forwarder(publisher) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),)), pod_identity()) as agent,
    ):
        first = agent.state.session_id
        tunnel = await wait_for(lambda: env.tunnel_for(first), what="Tunnel")
        name = tunnel["metadata"]["name"]
        await env.custom.delete_namespaced_custom_object(
            GROUP, VERSION, env.namespace, PLURAL, name
        )

        def first_session_ended() -> bool:
            live = {s.id for s in fw.forwarder.registry}
            listed = {t["id"] for t in fw.tunnels()}
            return first not in live and first not in listed

        await wait_for(first_session_ended, what="the session to end")
        assert (
            counter(publisher, "jobtunnel_forwarder_tunnel_sessions_ended_total", reason="deleted")
            == 1
        )
        # The agent reconnects (a new session): publishing it again is right.
        await wait_for(
            lambda: agent.state.published and agent.state.session_id != first, what="reconnect"
        )
        again = await wait_for(lambda: env.tunnel_for(agent.state.session_id), what="new Tunnel")
        assert again["metadata"]["name"] == name
        assert again["metadata"]["uid"] != tunnel["metadata"]["uid"]


async def test_takeover_updates_the_tunnel_in_place(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    identity_uid = str(uuid.uuid4())
    async with (
        echo_server() as old_port,
        echo_server() as new_port,
        env.forwarder(publisher, heartbeat_interval=10.0) as fw,
        freezable_proxy(fw.ssh) as (proxy, frozen),
        running_agent(
            agent_settings(proxy, fw.fingerprint, services=(("scheduler", old_port),)),
            pod_identity(identity_uid),
        ) as old_agent,
    ):
        old = await wait_for(lambda: env.tunnel_for(old_agent.state.session_id), what="Tunnel")
        old_listener = old["spec"]["services"][0]["port"]
        # The job restarted somewhere else: the old connection is silently dead (no FIN) and
        # the forwarder will only notice at the heartbeat deadline, long after the new one.
        frozen.set()
        async with running_agent(
            agent_settings(fw, services=(("scheduler", new_port),)), pod_identity(identity_uid)
        ) as new_agent:
            new = await wait_for(lambda: env.tunnel_for(new_agent.state.session_id), what="update")
            assert new["metadata"]["name"] == old["metadata"]["name"]
            assert new["metadata"]["uid"] == old["metadata"]["uid"]  # the same object
            assert len(await env.tunnels()) == 1
            (service,) = new["spec"]["services"]
            assert service["remotePort"] == new_port
            assert service["port"] != old_listener  # the old listener was still open
            assert (
                counter(publisher, "jobtunnel_forwarder_tunnel_syncs_total", operation="update")
                >= 1
            )
            assert (
                counter(publisher, "jobtunnel_forwarder_tunnel_syncs_total", operation="delete")
                == 0
            )


async def test_status_heartbeat_is_patched_and_throttled(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name, heartbeat_interval=1.0)
    async with (
        echo_server() as port,
        env.forwarder(publisher, heartbeat_interval=0.2) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),)), pod_identity()) as agent,
    ):
        tunnel = await wait_for(lambda: env.tunnel_for(agent.state.session_id), what="Tunnel")
        name = tunnel["metadata"]["name"]
        first = await wait_for(lambda: _status_heartbeat(env, name), what="lastHeartbeat")

        async def advanced() -> bool:
            current = await _status_heartbeat(env, name)
            return current is not None and current > first

        await wait_for(advanced, what="lastHeartbeat to advance")

        def heartbeats() -> float:
            return counter(publisher, "jobtunnel_forwarder_tunnel_heartbeats_total")

        await wait_for(lambda: heartbeats() >= 20, what="20 heartbeats")
        patches = counter(publisher, "jobtunnel_forwarder_tunnel_syncs_total", operation="status")
        assert 2 <= patches < heartbeats() / 2, (patches, heartbeats())


async def test_session_published_while_apiserver_is_down_gets_its_tunnel(
    env: Env,
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    async with (
        echo_server() as port,
        env.forwarder(publisher) as fw,
        anyio.create_task_group() as tg,
    ):
        await wait_for(lambda: publisher.ready_check() is None, what="publisher synced")
        restarted = anyio.Event()

        async def restart() -> None:
            await anyio.to_thread.run_sync(kube_api.restart_apiserver)
            restarted.set()

        tg.start_soon(restart)
        # The watch breaks when the API server goes: not ready.
        await wait_for(lambda: publisher.ready_check() is not None, what="not ready")
        assert "kubernetes api unreachable" in str(publisher.ready_check())
        assert fw.forwarder.ready_check() is not None  # /readyz follows
        async with running_agent(
            agent_settings(fw, services=(("scheduler", port),)), pod_identity()
        ) as agent:
            assert not restarted.is_set(), "the API server came back before the agent published"
            assert publisher.ready_check() is not None
            await restarted.wait()
            await wait_for(
                lambda: env.tunnel_for(agent.state.session_id), what="Tunnel after restart"
            )
            await wait_for(lambda: publisher.ready_check() is None, what="ready again")
            assert len(await env.tunnels()) == 1


async def test_forwarder_pod_deletion_garbage_collects_its_tunnels(env: Env) -> None:
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    async with (
        echo_server() as port,
        env.forwarder(publisher) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),)), pod_identity()) as agent,
    ):
        tunnel = await wait_for(lambda: env.tunnel_for(agent.state.session_id), what="Tunnel")
        await client.CoreV1Api(env.api).delete_namespaced_pod(
            env.pod_name, env.namespace, grace_period_seconds=0
        )
        # The garbage collector, not the forwarder (which could not know), removes it. The
        # session ends with it; its reconnect may publish again (owned by a pod that no longer
        # exists, so collected again): only the first object matters here.
        await wait_for(lambda: _gone(env, tunnel), GC_DEADLINE, what="garbage collection")


async def test_startup_removes_own_leftovers_only(env: Env) -> None:
    other_pod = "jobtunnel-forwarder-7d9f8-other"
    other_uid = await create_forwarder_pod(env.api, env.namespace, other_pod, "10.244.2.20")

    def leftover(name: str, pod: str, uid: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Tunnel",
            "metadata": {
                "name": name,
                "labels": {LABEL_FORWARDER_POD: pod},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}],
            },
            "spec": {
                "sessionId": f"old-{name}",
                "user": "alice",
                "forwarder": {"podName": pod, "podIP": "10.244.9.9"},
                "services": [{"name": "scheduler", "port": 40000}],
            },
        }

    # An earlier incarnation of this very pod name left one behind; another replica holds one.
    for body in (
        leftover("alice-0000000000", env.pod_name, str(uuid.uuid4())),
        leftover("alice-1111111111", other_pod, other_uid),
    ):
        await env.custom.create_namespaced_custom_object(
            GROUP, VERSION, env.namespace, PLURAL, body
        )
    publisher = make_publisher(env.api, env.namespace, env.pod_name)
    async with env.forwarder(publisher):

        async def only_other() -> bool:
            return [t["metadata"]["name"] for t in await env.tunnels()] == ["alice-1111111111"]

        await wait_for(only_other, what="the leftover deleted, the other replica's kept")
        await wait_for(lambda: publisher.ready_check() is None, what="ready")


async def test_takeover_across_replicas(env: Env, api: client.ApiClient) -> None:
    pod_b = "jobtunnel-forwarder-7d9f8-bbbbb"
    uid_b = await create_forwarder_pod(api, env.namespace, pod_b, "10.244.2.20")
    pub_a = make_publisher(api, env.namespace, env.pod_name)
    pub_b = make_publisher(api, env.namespace, pod_b, pod_ip="10.244.2.20")
    identity_uid = str(uuid.uuid4())
    (env.tmp / "b").mkdir()
    env_b = Env(env.tmp / "b", api, env.namespace, pod_b, uid_b)
    write_token_file(env_b.tmp / "tokens", TOKENS)
    async with (
        echo_server() as port,
        env.forwarder(pub_a, heartbeat_interval=2.0) as fw_a,
        env_b.forwarder(pub_b, advertise_host="10.244.2.20") as fw_b,
        freezable_proxy(fw_a.ssh) as (proxy, frozen),
        running_agent(
            agent_settings(proxy, fw_a.fingerprint, services=(("scheduler", port),)),
            pod_identity(identity_uid),
        ) as agent_a,
    ):
        first = await wait_for(lambda: env.tunnel_for(agent_a.state.session_id), what="on A")
        frozen.set()  # the job's connection to replica A dies silently...
        async with running_agent(  # ...and it comes back through replica B
            agent_settings(fw_b, services=(("scheduler", port),)), pod_identity(identity_uid)
        ) as agent_b:
            moved = await wait_for(lambda: env.tunnel_for(agent_b.state.session_id), what="on B")
            # B refused it while A's Tunnel said "alive" (A heartbeats it), and let it in once
            # A had declared its session dead (3 heartbeat intervals) and removed its Tunnel.
            assert agent_b.state.identity_conflicts >= 1
            assert moved["metadata"]["name"] == first["metadata"]["name"]
            assert moved["metadata"]["labels"][LABEL_FORWARDER_POD] == pod_b
            assert moved["spec"]["forwarder"] == {"podName": pod_b, "podIP": "10.244.2.20"}
            assert [r["uid"] for r in moved["metadata"]["ownerReferences"]] == [uid_b]
            # A's session ended at its heartbeat deadline and A removed its own Tunnel; from
            # then on A must leave B's Tunnel alone.
            await wait_for(lambda: fw_a.forwarder.registry.published() == [], what="A ends")
            await wait_for(lambda: pub_a.desired_names() == {}, what="A wants nothing")
            deletes = counter(pub_a, "jobtunnel_forwarder_tunnel_syncs_total", operation="delete")
            for _ in range(3):  # a few of A's sync passes
                await wait_for(lambda: pub_a.ready_check() is None, what="A synced")
                current = await env.tunnel(first["metadata"]["name"])
                assert current is not None
                assert current["spec"]["sessionId"] == agent_b.state.session_id
                await anyio.sleep(0.2)  # observation window, not synchronisation
            assert (
                counter(pub_a, "jobtunnel_forwarder_tunnel_syncs_total", operation="delete")
                == deletes
            )


async def test_live_holder_on_another_replica_keeps_its_identity(
    env: Env, api: client.ApiClient
) -> None:
    """A stolen token used against replica B while alice's session lives on A: refused with
    ``identity-held`` (A's Tunnel heartbeats); once A's heartbeat is stale, B may take it."""
    pod_b = "jobtunnel-forwarder-7d9f8-ccccc"
    await create_forwarder_pod(api, env.namespace, pod_b, "10.244.2.21")
    pub_a = make_publisher(api, env.namespace, env.pod_name, heartbeat_interval=0.5)
    pub_b = make_publisher(api, env.namespace, pod_b, pod_ip="10.244.2.21")
    pub_b.holder_stale_after = 5.0
    identity_uid = str(uuid.uuid4())
    (env.tmp / "b").mkdir()
    env_b = Env(env.tmp / "b", api, env.namespace, pod_b, "")
    write_token_file(env_b.tmp / "tokens", TOKENS)
    async with (
        echo_server(b"A:") as port,
        env.forwarder(pub_a) as fw_a,
        env_b.forwarder(pub_b, advertise_host="10.244.2.21") as fw_b,
        running_agent(
            agent_settings(fw_a, services=(("scheduler", port),)), pod_identity(identity_uid)
        ) as victim,
    ):
        held = await wait_for(lambda: env.tunnel_for(victim.state.session_id), what="on A")
        async with running_agent(
            agent_settings(fw_b, services=(("scheduler", port),)),
            pod_identity(identity_uid),
            published=False,
        ) as thief:
            await wait_for(lambda: thief.state.identity_conflicts >= 2, what="refused twice")
            assert not thief.state.published
            assert fw_b.forwarder.registry.published() == []
            current = await env.tunnel(held["metadata"]["name"])
            assert current is not None
            assert current["spec"]["sessionId"] == victim.state.session_id
            assert victim.state.published

        # A replica that stopped heartbeating (its node gone, say) holds nothing: its
        # Tunnel's heartbeat is made a minute old and A's next patch held back.
        pub_a.heartbeat_interval = 3600.0
        name = held["metadata"]["name"]
        await env.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            env.namespace,
            PLURAL,
            name,
            {"status": {"lastHeartbeat": iso_time(time.time() - 60)}},
            _content_type="application/merge-patch+json",
        )
        claim = fake_session("alice", ("alice", f"pod:{identity_uid}"))
        assert await pub_b.held_elsewhere(claim) is None
        async with running_agent(
            agent_settings(fw_b, services=(("scheduler", port),)), pod_identity(identity_uid)
        ) as successor:
            moved = await wait_for(
                lambda: env.tunnel_for(successor.state.session_id), what="taken over on B"
            )
            assert moved["metadata"]["uid"] == held["metadata"]["uid"]
            assert moved["spec"]["forwarder"]["podName"] == pod_b


# -- RBAC ----------------------------------------------------------------------------------------

SA = "jobtunnel-forwarder"


def rbac_documents(namespace: str) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(RBAC_FILE.read_text()):
        doc = copy.deepcopy(doc)
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects", []):
            subject["namespace"] = namespace
        yield doc


async def apply_rbac(api: client.ApiClient, namespace: str) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    create = {
        "ServiceAccount": core.create_namespaced_service_account,
        "Role": rbac.create_namespaced_role,
        "RoleBinding": rbac.create_namespaced_role_binding,
    }
    for doc in rbac_documents(namespace):
        try:
            await create[doc["kind"]](namespace, doc)
        except ApiException as exc:
            if exc.status != 409:
                raise


def test_rbac_is_namespaced_least_privilege() -> None:
    docs = list(rbac_documents("ns"))
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding"}
    (role,) = [d for d in docs if d["kind"] == "Role"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"tunnels", "tunnels/status", "pods"}
    pods = next(rule for rule in role["rules"] if rule["resources"] == ["pods"])
    assert pods["verbs"] == ["patch"]
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])


async def test_rbac_allows_exactly_what_the_forwarder_needs(
    env: Env,
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    await apply_rbac(env.api, env.namespace)
    user = f"system:serviceaccount:{env.namespace}:{SA}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{env.namespace}"]
    authz = client.AuthorizationV1Api(env.api)

    async def allowed(verb: str, resource: str, group: str = "", sub: str = "") -> bool:
        review = await authz.create_subject_access_review(
            client.V1SubjectAccessReview(
                spec=client.V1SubjectAccessReviewSpec(
                    user=user,
                    groups=[*groups, "system:authenticated"],
                    resource_attributes=client.V1ResourceAttributes(
                        namespace=env.namespace,
                        verb=verb,
                        group=group,
                        resource=resource,
                        subresource=sub or None,
                    ),
                )
            )
        )
        return bool(review.status.allowed)

    # RBAC reads bindings from an informer cache: give it a moment.
    await wait_for(lambda: allowed("create", "tunnels", GROUP), 20, what="the binding")
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert await allowed(verb, "tunnels", GROUP), verb
    assert await allowed("patch", "tunnels", GROUP, "status")
    assert await allowed("patch", "pods")
    for verb, resource in (
        ("patch", "services"),
        ("update", "services"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("get", "pods"),
        ("delete", "pods"),
        ("create", "events"),
    ):
        assert not await allowed(verb, resource), (verb, resource)
    assert not await allowed("create", "tunnels", "other.io")

    # Actual calls with the service account's own token.
    token = await anyio.to_thread.run_sync(kube_api.service_account_token, env.namespace, SA)
    kubeconfig = kube_api.write_kubeconfig(
        env.tmp / "forwarder.kubeconfig", token, user=SA, namespace=env.namespace
    )
    core = client.CoreV1Api(env.api)
    await core.create_namespaced_service(
        env.namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="dask-alice-scheduler"),
            spec=client.V1ServiceSpec(
                selector={"app": "x"}, ports=[client.V1ServicePort(port=8786)]
            ),
        ),
    )
    await core.create_namespaced_secret(
        env.namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="s"), string_data={"a": "b"}),
    )
    async with await client_for(kubeconfig) as sa_api:
        sa_core: Any = client.CoreV1Api(sa_api)
        sa_custom: Any = client.CustomObjectsApi(sa_api)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Tunnel",
            "metadata": {"name": "probe"},
            "spec": {
                "sessionId": "x",
                "user": "alice",
                "forwarder": {"podName": env.pod_name, "podIP": POD_IP},
                "services": [],
            },
        }
        await sa_custom.create_namespaced_custom_object(GROUP, VERSION, env.namespace, PLURAL, body)
        await sa_custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            env.namespace,
            PLURAL,
            "probe",
            {"spec": {"user": "bob"}},
            _content_type=MERGE,
        )
        await sa_custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            env.namespace,
            PLURAL,
            "probe",
            {"status": {"lastHeartbeat": "2024-01-01T00:00:00Z"}},
            _content_type=MERGE,
        )
        await sa_custom.delete_namespaced_custom_object(
            GROUP, VERSION, env.namespace, PLURAL, "probe"
        )
        await sa_core.patch_namespaced_pod(
            env.pod_name,
            env.namespace,
            {"metadata": {"labels": {"probe": "1"}}},
            _content_type=MERGE,
        )
        for attempt in (
            sa_core.patch_namespaced_service(
                "dask-alice-scheduler",
                env.namespace,
                {"spec": {"selector": {"app": "y"}}},
                _content_type=MERGE,
            ),
            sa_core.read_namespaced_secret("s", env.namespace),
            sa_core.list_namespaced_secret(env.namespace),
            sa_core.read_namespaced_pod(env.pod_name, env.namespace),
            sa_core.list_namespaced_service(env.namespace),
        ):
            with pytest.raises(ApiException) as denied:
                await attempt
            assert denied.value.status == 403

        # End to end under least privilege: the publisher itself with these credentials.
        publisher = make_publisher(sa_api, env.namespace, env.pod_name, heartbeat_interval=1.0)
        async with (
            echo_server() as port,
            env.forwarder(publisher, heartbeat_interval=0.3) as fw,
        ):
            await wait_for(lambda: publisher.ready_check() is None, what="publisher synced")
            async with running_agent(
                agent_settings(fw, services=(("scheduler", port),)), pod_identity()
            ) as agent:
                tunnel = await wait_for(
                    lambda: env.tunnel_for(agent.state.session_id), what="Tunnel"
                )
                await wait_for(
                    lambda: _status_heartbeat(env, tunnel["metadata"]["name"]),
                    what="status",
                )
                assert publisher.pod_uid == env.pod_uid
                await agent.bye("done")
                await wait_for(lambda: _gone(env, tunnel), what="Tunnel deleted")
            assert publisher.ready_check() is None
            refused = [
                sample
                for metric in publisher.metrics.registry.collect()
                if metric.name == "jobtunnel_forwarder_tunnel_sync_errors"
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.value
            ]
            assert refused == [], "no API call of the publisher failed"
