"""Smoke tests of the test control plane (tests/kube.py) through kubernetes_asyncio.

Each one checks a behaviour the reconciler's tests rely on, so that when one of those fails we
know the API server is not the reason: objects round-trip, custom resources accept merge patches
(and the reflect2 fix holds), the garbage collector and the endpoints controller run, RBAC
denies, and state survives an API server restart.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube import UNPRIVILEGED_USER, KubeAPIServer, kube_api  # noqa: F401

pytestmark = pytest.mark.anyio

CRD_GROUP = "smoke.jobtunnel.io"
CRD_PLURAL = "widgets"


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], seconds: float, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it is true; fail after ``seconds``.

    Controllers act asynchronously and offer nothing to await, so tests poll; the deadline keeps
    a broken controller from hanging the suite.
    """
    with anyio.move_on_after(seconds):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.1)
    pytest.fail(f"timed out after {seconds}s waiting for {what}")


async def api_client_for(kubeconfig: str) -> client.ApiClient:
    """An ApiClient bound to one kubeconfig (not the process-global default configuration)."""
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


@pytest.fixture
async def api(kube_api: KubeAPIServer) -> AsyncIterator[client.ApiClient]:  # noqa: F811
    async with await api_client_for(str(kube_api.kubeconfig)) as api_client:
        yield api_client


@pytest.fixture
async def namespace(api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace per test (the control plane is shared by the session)."""
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    await core.delete_namespace(name)


def is_not_found(exc: ApiException) -> bool:
    return exc.status == 404


async def test_namespace_and_service_round_trip(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    service = client.V1Service(
        metadata=client.V1ObjectMeta(name="web", labels={"app": "web"}),
        spec=client.V1ServiceSpec(
            selector={"app": "web"},
            ports=[client.V1ServicePort(name="http", port=80, target_port=8080)],
        ),
    )
    await core.create_namespaced_service(namespace, service)

    read = await core.read_namespaced_service("web", namespace)
    assert read.metadata.labels == {"app": "web"}
    assert read.spec.selector == {"app": "web"}
    assert read.spec.ports[0].target_port == 8080
    assert read.spec.cluster_ip.startswith("10.96.")


def widget_crd() -> dict[str, Any]:
    """A minimal namespaced CRD with a status subresource, like the Tunnel CRD."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{CRD_PLURAL}.{CRD_GROUP}"},
        "spec": {
            "group": CRD_GROUP,
            "scope": "Namespaced",
            "names": {"plural": CRD_PLURAL, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "size": {"type": "integer"},
                                        "color": {"type": "string"},
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


async def test_custom_resource_merge_patch(api: client.ApiClient, namespace: str) -> None:
    extensions = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    crd_name = f"{CRD_PLURAL}.{CRD_GROUP}"
    # Plain dicts are accepted at runtime; the bundled .pyi stubs only know the model classes.
    await extensions.create_custom_resource_definition(widget_crd())  # type: ignore[arg-type]
    try:

        async def established() -> bool:
            crd = await extensions.read_custom_resource_definition(crd_name)
            return any(
                c.type == "Established" and c.status == "True"
                for c in (crd.status.conditions or [])
            )

        await wait_for(established, 30, "CRD established")

        body = {
            "apiVersion": f"{CRD_GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 1, "color": "red"},
        }
        # The first custom-resource create is what crashed the apiserver with reflect2 v1.0.1.
        await custom.create_namespaced_custom_object(CRD_GROUP, "v1", namespace, CRD_PLURAL, body)
        # Custom resources take no strategic merge patch, the client's default for a dict body.
        # `_content_type` works at runtime but is missing from kubernetes_asyncio's stubs.
        await custom.patch_namespaced_custom_object(  # type: ignore[call-arg]
            CRD_GROUP,
            "v1",
            namespace,
            CRD_PLURAL,
            "w1",
            {"spec": {"size": 3}},
            _content_type="application/merge-patch+json",
        )
        await custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
            CRD_GROUP,
            "v1",
            namespace,
            CRD_PLURAL,
            "w1",
            {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            _content_type="application/merge-patch+json",
        )

        obj = await custom.get_namespaced_custom_object(
            CRD_GROUP, "v1", namespace, CRD_PLURAL, "w1"
        )
        assert obj["spec"] == {"size": 3, "color": "red"}
        assert obj["status"]["conditions"] == [{"type": "Ready", "status": "True"}]
    finally:
        await extensions.delete_custom_resource_definition(crd_name)


async def test_garbage_collector_deletes_dependents(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    owner = await core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    dependent = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(
            name="dependent",
            owner_references=[
                client.V1OwnerReference(
                    api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
                )
            ],
        )
    )
    await core.create_namespaced_config_map(namespace, dependent)
    await core.delete_namespaced_config_map("owner", namespace)

    async def dependent_gone() -> bool:
        try:
            await core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            if is_not_found(exc):
                return True
            raise
        return False

    await wait_for(dependent_gone, 30, "the garbage collector to delete the dependent")


async def test_endpoints_controller_follows_ready_pod(
    api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="backend", labels={"app": "backend"}),
        spec=client.V1PodSpec(
            node_name="fake-node",  # bound already: no scheduler, no kubelet
            containers=[
                client.V1Container(
                    name="main",
                    image="example.invalid/backend:1",
                    ports=[client.V1ContainerPort(container_port=8786)],
                )
            ],
        ),
    )
    await core.create_namespaced_pod(namespace, pod)
    # What a kubelet would report; the Ready condition is what the endpoints controller reads.
    await core.patch_namespaced_pod_status(
        "backend",
        namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": "10.244.0.5",
                "podIPs": [{"ip": "10.244.0.5"}],
                "conditions": [
                    {"type": "Ready", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                ],
            }
        },
    )
    await core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="backend"),
            spec=client.V1ServiceSpec(
                selector={"app": "backend"},
                ports=[client.V1ServicePort(port=8786, target_port=8786)],
            ),
        ),
    )

    async def endpoint_has_pod_ip() -> bool:
        try:
            endpoints = await core.read_namespaced_endpoints("backend", namespace)
        except ApiException as exc:
            if is_not_found(exc):
                return False
            raise
        return any(
            address.ip == "10.244.0.5" and address.target_ref.name == "backend"
            for subset in endpoints.subsets or []
            for address in subset.addresses or []
        )

    await wait_for(endpoint_has_pod_ip, 30, "Endpoints to list the pod IP")


async def test_rbac_denies_unprivileged_users(
    api: client.ApiClient,
    namespace: str,
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    # A static-token user without any binding.
    async with await api_client_for(str(kube_api.kubeconfig_for(UNPRIVILEGED_USER))) as nobody:
        with pytest.raises(ApiException) as denied:
            await client.CoreV1Api(nobody).list_namespaced_service(namespace)
        assert denied.value.status == 403

    # A service account (the daemons' identity in a cluster): denied, then allowed by a Role.
    token = await anyio.to_thread.run_sync(kube_api.service_account_token, namespace, "reader")
    sa_kubeconfig = kube_api.write_kubeconfig(
        kube_api.directory / f"{namespace}-reader.kubeconfig", token, user="reader"
    )
    async with await api_client_for(str(sa_kubeconfig)) as reader:
        with pytest.raises(ApiException) as denied:
            await client.CoreV1Api(reader).list_namespaced_service(namespace)
        assert denied.value.status == 403

        rbac = client.RbacAuthorizationV1Api(api)
        await rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="service-reader"),
                rules=[
                    client.V1PolicyRule(
                        api_groups=[""], resources=["services"], verbs=["get", "list"]
                    )
                ],
            ),
        )
        await rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="service-reader"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="service-reader"
                ),
                subjects=[
                    client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)
                ],
            ),
        )

        async def allowed() -> bool:
            try:
                await client.CoreV1Api(reader).list_namespaced_service(namespace)
            except ApiException as exc:
                if exc.status == 403:
                    return False
                raise
            return True

        # RBAC reads bindings from an informer cache: allow it a moment to catch up.
        await wait_for(allowed, 10, "the RoleBinding to take effect")


async def test_state_survives_apiserver_restart(
    api: client.ApiClient,
    namespace: str,
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    core = client.CoreV1Api(api)
    await core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="kept"), data={"k": "v"}),
    )
    old_port = kube_api.port
    await anyio.to_thread.run_sync(kube_api.restart_apiserver)
    assert kube_api.port == old_port

    # The existing client reconnects: same URL, same CA, same token.
    kept = await core.read_namespaced_config_map("kept", namespace)
    assert kept.data == {"k": "v"}
