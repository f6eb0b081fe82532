"""The user-facing helpers of jobtunnel.dask: the offloaded DaskCluster spec, the token Secret,
OffloadedKubeCluster, and the JupyterHub config files in configs/jupyterhub.

Plain unit tests check the spec against dask-kubernetes' own ``make_cluster_spec`` and the
agent's own settings loader; the slow ones run the real Dask operator on a real API server
(tests/dask_operator.py) and kr8s against it with exactly the RBAC of configs/jupyterhub/rbac.yaml.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import copy
import importlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dask.config
import pytest
import yaml
from dask_kubernetes.operator import make_cluster_spec
from kubernetes_asyncio import client

from daemons.agent.settings import AgentSettings
from jobtunnel import dask as jd
from shared import config
from shared.auth import AuthDecision, HubVerifier
from tests.dask_operator import (
    VIRTUAL_NODE,
    VIRTUAL_NODE_TAINT,
    DaskOperator,
    dask_operator,  # noqa: F401
)
from tests.jupyterhub import JupyterHub, jupyterhub  # noqa: F401
from tests.kube import KubeAPIServer, kube_api  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "jupyterhub"
FINGERPRINT = "SHA256:" + "Ab0+/" * 8 + "xyz"
FORWARDER = "forwarder.example.org:31022"
SENTINEL_TOKEN = "sentinel-token-" + uuid.uuid4().hex


def spec(**kw: Any) -> dict[str, Any]:
    name = kw.pop("name", "analysis")
    args: dict[str, Any] = {
        "image": "ghcr.io/example/jobtunnel-dask:1",
        "forwarder": FORWARDER,
        "host_key_fingerprint": FINGERPRINT,
        "user": "alice",
        "n_workers": 2,
    }
    args.update(kw)
    return jd.offloaded_cluster_spec(name, **args)


def scheduler_container(s: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = s["spec"]["scheduler"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["scheduler"]
    return containers[0]


def env_map(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


# -- the spec (unit) ----------------------------------------------------------------------------


def test_scheduler_command_wraps_the_operators_args() -> None:
    stock = make_cluster_spec(name="analysis", image="img", n_workers=2)
    stock_container = stock["spec"]["scheduler"]["spec"]["containers"][0]
    # What dask-kubernetes 2026.3.0 sends: args only, no command (the image's ENTRYPOINT runs).
    assert "command" not in stock_container
    assert stock_container["args"] == ["dask-scheduler", "--host", "0.0.0.0"]

    container = scheduler_container(spec(image="img"))
    assert container["command"] == ["jobtunnel-agent", "--"]
    assert container["args"] == stock_container["args"]
    # Kubernetes execs command + args; the agent's main() splits at the first "--" and runs the
    # rest as its child: exactly the operator's scheduler command line.
    argv = container["command"] + container["args"]
    assert argv[0] == "jobtunnel-agent"
    assert argv[argv.index("--") + 1 :] == stock_container["args"]

    # jupyter=True adds --jupyter to the args; it is kept too. A custom agent path is honoured.
    container = scheduler_container(spec(jupyter=True, agent_command="/opt/jt/bin/jobtunnel-agent"))
    assert container["command"] == ["/opt/jt/bin/jobtunnel-agent", "--"]
    assert container["args"] == ["dask-scheduler", "--host", "0.0.0.0", "--jupyter"]


def test_everything_else_is_what_kubecluster_sends() -> None:
    kw: dict[str, Any] = {
        "image": "img",
        "n_workers": 3,
        "resources": {"limits": {"cpu": "2"}},
        "env": {"EXTRA_PIP_PACKAGES": "xarray"},
    }
    stock = make_cluster_spec(name="analysis", **kw)
    ours = spec(**kw)
    # Undo what offloaded_cluster_spec adds: the rest must be identical.
    undone = copy.deepcopy(ours)
    for part in ("scheduler", "worker"):
        pod = undone["spec"][part]["spec"]
        assert pod.pop("nodeSelector")
        assert pod.pop("tolerations")
    pod = undone["spec"]["scheduler"]["spec"]
    assert pod.pop("volumes")
    container = pod["containers"][0]
    container.pop("command")
    container.pop("volumeMounts")
    container["env"] = [e for e in container["env"] if not e["name"].startswith("JOBTUNNEL_")]
    metadata = undone["metadata"]
    user_key = jd.USER_KEY
    assert metadata["labels"].pop(user_key) == metadata["annotations"].pop(user_key) == "alice"
    for key in ("labels", "annotations"):
        if not metadata[key]:
            del metadata[key]
    assert undone == stock
    # The user's env reaches scheduler and workers, as with KubeCluster.
    assert env_map(scheduler_container(ours))["EXTRA_PIP_PACKAGES"] == "xarray"
    worker = ours["spec"]["worker"]["spec"]["containers"][0]
    assert env_map(worker) == {"EXTRA_PIP_PACKAGES": "xarray"}


def test_agent_settings_and_downward_api() -> None:
    env = env_map(scheduler_container(spec()))
    assert env["JOBTUNNEL_POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["JOBTUNNEL_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["JOBTUNNEL_POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    assert env["JOBTUNNEL_FORWARDER"] == FORWARDER
    assert env["JOBTUNNEL_USER"] == "alice"
    assert env["JOBTUNNEL_HOST_KEY_FINGERPRINT"] == FINGERPRINT
    assert env["JOBTUNNEL_SERVICES"] == "scheduler=8786,dashboard=8787"
    assert env["JOBTUNNEL_TOKEN_FILE"] == "/var/run/jobtunnel/token"


def test_the_agent_accepts_the_environment(tmp_path: Path) -> None:
    """The agent's own settings loader, fed the container env as Kubernetes would resolve it."""
    token_file = tmp_path / "token"
    token_file.write_text("hub-token\n")
    token_file.chmod(0o400)
    resolved = {"metadata.namespace": "jupyter-alice", "metadata.name": "p", "metadata.uid": "u"}
    environ: dict[str, str] = {}
    for name, value in env_map(scheduler_container(spec())).items():
        environ[name] = (
            value if isinstance(value, str) else resolved[value["fieldRef"]["fieldPath"]]
        )
    environ["JOBTUNNEL_TOKEN_FILE"] = str(token_file)
    assert config.unknown_environment(AgentSettings, environ) == []
    settings = config.load(AgentSettings, environ=environ)
    settings.check()
    settings.read_token()
    assert settings.user == "alice"
    assert settings.services == (("scheduler", 8786), ("dashboard", 8787))
    assert (settings.pod_namespace, settings.pod_name, settings.pod_uid) == (
        "jupyter-alice",
        "p",
        "u",
    )
    assert settings.host_key_fingerprint == FINGERPRINT


def test_token_travels_as_a_0400_secret_file_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", SENTINEL_TOKEN)
    s = spec(token_secret="my-token")
    assert SENTINEL_TOKEN not in json.dumps(s)
    pod = s["spec"]["scheduler"]["spec"]
    assert pod["volumes"] == [
        {"name": "jobtunnel-token", "secret": {"secretName": "my-token", "defaultMode": 0o400}}
    ]
    assert pod["volumes"][0]["secret"]["defaultMode"] == 256
    container = scheduler_container(s)
    assert container["volumeMounts"] == [
        {"name": "jobtunnel-token", "mountPath": "/var/run/jobtunnel", "readOnly": True}
    ]
    names = {e["name"] for e in container["env"]}
    assert not names & {"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "JOBTUNNEL_TOKEN"}
    # Workers get no token at all.
    worker_pod = s["spec"]["worker"]["spec"]
    assert "volumes" not in worker_pod
    # A token in env would end up in InterLink's world-readable env file: refused.
    for env in ({"JUPYTERHUB_API_TOKEN": "x"}, [{"name": "JPY_API_TOKEN", "value": "x"}]):
        with pytest.raises(ValueError, match="must not be set"):
            spec(env=env)


def test_placement_on_the_virtual_node() -> None:
    s = spec()
    for part in ("scheduler", "worker"):
        pod = s["spec"][part]["spec"]
        assert pod["nodeSelector"] == dict(jd.DEFAULT_NODE_SELECTOR)
        assert pod["tolerations"] == [dict(t) for t in jd.DEFAULT_TOLERATIONS]
    custom = spec(
        node_selector={"kubernetes.io/hostname": "vk-pool-b"},
        tolerations=[{"key": "pool-b", "operator": "Exists"}],
    )
    assert custom["spec"]["scheduler"]["spec"]["nodeSelector"] == {
        "kubernetes.io/hostname": "vk-pool-b"
    }
    assert custom["spec"]["worker"]["spec"]["tolerations"] == [
        {"key": "pool-b", "operator": "Exists"}
    ]
    with pytest.warns(UserWarning, match="private IP"):
        local = spec(workers_on_virtual_node=False)
    assert "nodeSelector" not in local["spec"]["worker"]["spec"]
    assert local["spec"]["scheduler"]["spec"]["nodeSelector"] == dict(jd.DEFAULT_NODE_SELECTOR)


def test_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    with pytest.raises(ValueError, match=r"\$JUPYTERHUB_USER is not set"):
        spec(user=None)
    monkeypatch.setenv("JUPYTERHUB_USER", "bob")
    assert env_map(scheduler_container(spec(user=None)))["JOBTUNNEL_USER"] == "bob"
    with pytest.raises(ValueError, match="host_key_fingerprint: expected"):
        spec(host_key_fingerprint="SHA256:short")
    with pytest.raises(ValueError, match="forwarder: expected host:port"):
        spec(forwarder="forwarder.example.org")
    with pytest.raises(ValueError, match="scheduler_services: expected"):
        spec(scheduler_services="scheduler:8786")


# -- Dask config, OffloadedKubeCluster, the package boundary (unit) ------------------------------


def jobtunnel_config() -> dict[str, Any]:
    """The whole Dask config with configs/jupyterhub/dask-jobtunnel.yaml merged in, as Dask merges
    a file of /etc/dask into its defaults (``dask.config.set`` alone would replace top-level
    sections such as ``distributed`` wholesale)."""
    import dask_kubernetes  # noqa: F401  (its kubernetes.* defaults, as in a notebook)

    loaded = yaml.safe_load((CONFIGS / "dask-jobtunnel.yaml").read_text())
    merged: dict[str, Any] = dask.config.merge(copy.deepcopy(dask.config.config), loaded)
    return merged


@pytest.fixture
def site_config() -> Iterator[None]:
    """configs/jupyterhub/dask-jobtunnel.yaml, with the SITE values a site would fill in."""
    cfg = jobtunnel_config()
    cfg["jobtunnel"]["forwarder"] = FORWARDER
    cfg["jobtunnel"]["host-key-fingerprint"] = FINGERPRINT
    with dask.config.set(cfg):
        yield


@pytest.mark.usefixtures("site_config")
def test_spec_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTERHUB_USER", "carol")
    s = jd.spec_from_config()
    # kubernetes.name "dask-{user}-{uuid}", formatted as KubeCluster does.
    assert s["metadata"]["name"].startswith("dask-")
    assert "{" not in s["metadata"]["name"]
    container = scheduler_container(s)
    assert container["image"] == "ghcr.io/example/jobtunnel-dask:latest"
    env = env_map(container)
    assert env["JOBTUNNEL_USER"] == "carol"
    assert env["JOBTUNNEL_FORWARDER"] == FORWARDER
    assert s["spec"]["worker"]["replicas"] == 0  # kubernetes.count.start
    # Arguments win over the config.
    s = jd.spec_from_config(name="mine", n_workers=4, token_secret="t2")
    assert s["metadata"]["name"] == "mine"
    assert s["spec"]["worker"]["replicas"] == 4
    assert s["spec"]["scheduler"]["spec"]["volumes"][0]["secret"]["secretName"] == "t2"
    with (
        dask.config.set({"jobtunnel.forwarder": None}),
        pytest.raises(
            ValueError, match=r"jobtunnel.forwarder is not set.*DASK_JOBTUNNEL__FORWARDER"
        ),
    ):
        jd.spec_from_config()


def test_the_shipped_config_refuses_to_run_unconfigured() -> None:
    with dask.config.set(jobtunnel_config()), pytest.raises(ValueError, match="is not set"):
        jd.spec_from_config()


@pytest.mark.usefixtures("site_config")
def test_labextension_factory_builds_an_offloaded_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """What dask-labextension's make_cluster does, with KubeCluster.__init__ recording only."""
    from dask_kubernetes.operator import KubeCluster

    seen: dict[str, Any] = {}

    def record(self: Any, **kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(KubeCluster, "__init__", record)
    monkeypatch.setenv("JUPYTERHUB_USER", "dave")
    factory = dask.config.get("labextension.factory")
    module = importlib.import_module(factory["module"])
    cls = getattr(module, factory["class"])
    assert issubclass(cls, KubeCluster)
    kwargs = {k.replace("-", "_"): v for k, v in factory["kwargs"].items()}
    cluster = cls(*factory["args"], **kwargs, asynchronous=True)
    assert seen["asynchronous"] is True
    built = seen["custom_cluster_spec"]
    assert built is cluster.offloaded_spec
    assert scheduler_container(built)["command"] == ["jobtunnel-agent", "--"]
    assert env_map(scheduler_container(built))["JOBTUNNEL_USER"] == "dave"
    assert cluster.token_secret == "jobtunnel-token"
    assert cluster.create_token_secret is True
    # Spec arguments go to the spec, KubeCluster's to KubeCluster.
    seen.clear()
    cls(name="named", n_workers=3, shutdown_on_close=False, create_token_secret=False)
    assert seen["custom_cluster_spec"]["metadata"]["name"] == "named"
    assert seen["custom_cluster_spec"]["spec"]["worker"]["replicas"] == 3
    assert seen["shutdown_on_close"] is False
    assert "n_workers" not in seen
    with pytest.raises(TypeError, match="builds its own spec"):
        cls(custom_cluster_spec={})


def test_dashboard_link_goes_through_the_server_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed.utils import format_dashboard_link

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    with dask.config.set(jobtunnel_config()):
        link = format_dashboard_link("analysis-scheduler.jupyter-alice", 8787)
    assert link == "/user/alice/proxy/analysis-scheduler.jupyter-alice:8787/status"


def test_server_proxy_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    from traitlets.config import Config

    monkeypatch.setenv("JOBTUNNEL_USER_NAMESPACE", "jupyter-alice")
    c = Config()
    code = (CONFIGS / "jupyter_server_config.py").read_text()
    exec(compile(code, "jupyter_server_config.py", "exec"), {"get_config": lambda: c})  # noqa: S102
    allow = c.ServerProxy.host_allowlist
    assert callable(allow)
    for host in (
        "localhost",
        "127.0.0.1",
        "analysis-scheduler.jupyter-alice",
        "dask-jovyan-1a2b3c4d5e-scheduler.jupyter-alice",
        "analysis-scheduler.jupyter-alice.svc.cluster.local",
    ):
        assert allow(None, host), host
    for host in (
        "analysis-scheduler.jupyter-bob",
        "analysis-scheduler.jupyter-alice.evil.example",
        "hub.jupyter-alice",
        "10.0.0.1",
        "metadata.google.internal",
    ):
        assert not allow(None, host), host


def test_package_imports_nothing_of_the_daemons() -> None:
    for path in (ROOT / "jobtunnel").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in {"daemons", "shared", "tests"}, (path, name)
    # And importing it pulls in no heavy dependency until used.
    code = (
        "import sys, jobtunnel, jobtunnel.dask\n"
        "heavy = {'dask', 'distributed', 'dask_kubernetes', 'kr8s', 'daemons', 'shared'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


# -- the real operator and kr8s (slow) ----------------------------------------------------------


@pytest.fixture
async def namespace(dask_operator: DaskOperator) -> AsyncIterator[str]:  # noqa: F811
    name = f"user-{uuid.uuid4().hex[:8]}"
    async with dask_operator.api() as api:
        core = client.CoreV1Api(api)
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        yield name
        await core.delete_namespace(name)


def deployment_env(deployment: client.V1Deployment) -> dict[str, Any]:
    container = deployment.spec.template.spec.containers[0]
    return {
        e.name: e.value if e.value_from is None else e.value_from.field_ref.field_path
        for e in container.env or []
    }


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_operator_accepts_the_spec(
    dask_operator: DaskOperator,  # noqa: F811
    namespace: str,
) -> None:
    since = dask_operator.log_offset()
    body = spec(name="offloaded", n_workers=2)
    await dask_operator.create_cluster(namespace, "offloaded", body=body)
    objects = await dask_operator.wait_for_objects(namespace, "offloaded")

    scheduler = objects.scheduler_deployment
    pod_spec = scheduler.spec.template.spec
    container = pod_spec.containers[0]
    assert container.command == ["jobtunnel-agent", "--"]
    assert container.args == ["dask-scheduler", "--host", "0.0.0.0"]
    assert pod_spec.node_selector == dict(jd.DEFAULT_NODE_SELECTOR)
    assert [(t.key, t.operator, t.effect) for t in pod_spec.tolerations] == [
        (VIRTUAL_NODE_TAINT["key"], "Exists", "NoSchedule")
    ]
    env = deployment_env(scheduler)
    assert env["JOBTUNNEL_POD_NAMESPACE"] == "metadata.namespace"
    assert env["JOBTUNNEL_POD_NAME"] == "metadata.name"
    assert env["JOBTUNNEL_POD_UID"] == "metadata.uid"
    assert env["JOBTUNNEL_TOKEN_FILE"] == "/var/run/jobtunnel/token"
    [volume] = pod_spec.volumes
    assert volume.secret.secret_name == "jobtunnel-token"
    assert volume.secret.default_mode == 0o400
    [mount] = container.volume_mounts
    assert (mount.mount_path, mount.read_only) == ("/var/run/jobtunnel", True)

    # Workers: both Deployments on the virtual node, without the token.
    assert len(objects.worker_deployments) == 2
    for worker in objects.worker_deployments:
        worker_pod = worker.spec.template.spec
        assert worker_pod.node_selector == dict(jd.DEFAULT_NODE_SELECTOR)
        assert [t.key for t in worker_pod.tolerations] == [VIRTUAL_NODE_TAINT["key"]]
        assert not worker_pod.volumes

    # The pods land on the virtual node (run_pod refuses a placement kube-scheduler would refuse)
    # and carry what the Deployment said.
    pod = await dask_operator.run_pod(namespace, scheduler.metadata.name)
    assert pod.spec.node_name == VIRTUAL_NODE
    assert pod.spec.containers[0].command == ["jobtunnel-agent", "--"]
    assert pod.spec.containers[0].args == ["dask-scheduler", "--host", "0.0.0.0"]
    worker_pod = await dask_operator.run_pod(namespace, objects.worker_deployments[0].metadata.name)
    assert worker_pod.spec.node_name == VIRTUAL_NODE

    await dask_operator.delete_cluster(namespace, "offloaded")
    await dask_operator.wait_for_cluster_gone(namespace, "offloaded")
    dask_operator.check_alive()
    assert dask_operator.problems(since) == [], dask_operator.log()[since:]


def apply_rbac(kube: KubeAPIServer, namespace: str, service_account: str) -> None:
    text = (CONFIGS / "rbac.yaml").read_text()
    text = text.replace("USER-NAMESPACE", namespace).replace("SERVICE-ACCOUNT", service_account)
    for doc in yaml.safe_load_all(text):
        plural = {"Role": "roles", "RoleBinding": "rolebindings"}[doc["kind"]]
        path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{plural}"
        status, body = kube.request("POST", path, doc)
        assert status == 201, body


def read_secret(kube: KubeAPIServer, namespace: str, name: str) -> tuple[int, Any]:
    return kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")


@pytest.mark.slow
# kr8s warns that it supports Kubernetes >= 1.28; the test API server is 1.20 (Secrets and
# RBAC have not changed since).
@pytest.mark.filterwarnings("ignore:Kubernetes version .* is not supported:UserWarning")
def test_ensure_token_secret_with_the_documented_rbac(
    kube_api: KubeAPIServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    ns = f"jupyter-{uuid.uuid4().hex[:8]}"
    token = kube_api.service_account_token(ns, "default")
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "sa.kubeconfig", token, namespace=ns))

    # The service account alone (KubeSpawner's default) may not: a clear PermissionError.
    with pytest.raises(PermissionError, match=r"configs/jupyterhub/rbac.yaml"):
        jd.ensure_token_secret(ns, token=SENTINEL_TOKEN, kubeconfig=kubeconfig)

    apply_rbac(kube_api, ns, "default")

    def written() -> str:
        status, secret = read_secret(kube_api, ns, "jobtunnel-token")
        assert status == 200, secret
        assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "jobtunnel"
        assert set(secret["data"]) == {"token"}
        return base64.b64decode(secret["data"]["token"]).decode()

    # The RBAC is applied asynchronously by the authorizer's informer: retry briefly.
    for attempt in range(50):
        try:
            assert jd.ensure_token_secret(token=SENTINEL_TOKEN, kubeconfig=kubeconfig) == ns
            break
        except PermissionError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    assert written() == SENTINEL_TOKEN
    # Another token of the site's making: the same Secret is updated.
    assert jd.ensure_token_secret(ns, token="second-" + SENTINEL_TOKEN, kubeconfig=kubeconfig) == ns
    assert written() == "second-" + SENTINEL_TOKEN
    # The rights stop there: another Secret name cannot be overwritten once it exists.
    status, _ = kube_api.request(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {"metadata": {"name": "other"}, "stringData": {"token": "x"}},
    )
    assert status == 201
    with pytest.raises(PermissionError, match="patch Secret"):
        jd.ensure_token_secret(ns, "other", token="y", kubeconfig=kubeconfig)


def test_user_named_for_the_reconciler_label_only_when_valid() -> None:
    plain = spec()
    assert plain["metadata"]["labels"][jd.USER_KEY] == "alice"
    odd = spec(user="alice@example.org")
    assert odd["metadata"]["annotations"][jd.USER_KEY] == "alice@example.org"
    assert jd.USER_KEY not in odd["metadata"].get("labels", {})


def hub_user_model(hub: JupyterHub, token: str) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - the test hub
        f"{hub.api_url}/user", headers={"Authorization": f"token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), None


async def forwarder_decision(hub: JupyterHub, user: str, token: str) -> AuthDecision:
    """What a forwarder with default settings decides for this token."""
    verifier = HubVerifier(hub.api_url)
    try:
        return await verifier.verify(user, token)
    finally:
        await verifier.aclose()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Kubernetes version .* is not supported:UserWarning")
def test_ensure_token_secret_mints_renews_and_revokes_tunnel_only_tokens(
    kube_api: KubeAPIServer,  # noqa: F811
    jupyterhub: JupyterHub,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    ns, user = f"jupyter-{suffix}", f"minter-{suffix}"
    jupyterhub.create_user(user)
    # The notebook's own token, as configs/jupyterhub/jupyterhub_config.py's server role has it.
    server_token, _ = jupyterhub.create_token(
        user, scopes=["users:activity!user", f"access:servers!server={user}/", "tokens!user"]
    )
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", server_token)
    monkeypatch.setenv("JUPYTERHUB_API_URL", jupyterhub.api_url)
    monkeypatch.setenv("JUPYTERHUB_USER", user)
    sa_token = kube_api.service_account_token(ns, "default")
    kubeconfig = str(kube_api.write_kubeconfig(tmp_path / "sa.kubeconfig", sa_token, namespace=ns))
    apply_rbac(kube_api, ns, "default")

    def stored() -> tuple[str, dict[str, str]]:
        status, secret = read_secret(kube_api, ns, "jobtunnel-token")
        assert status == 200, secret
        assert set(secret["data"]) == {"token"}
        return base64.b64decode(secret["data"]["token"]).decode(), secret["metadata"].get(
            "annotations", {}
        )

    # The RBAC is applied asynchronously by the authorizer's informer: retry briefly.
    started = time.time()
    for attempt in range(50):
        try:
            assert jd.ensure_token_secret(ns, kubeconfig=kubeconfig) == ns
            break
        except PermissionError:
            if attempt == 49:
                raise
            time.sleep(0.1)
    first, notes = stored()
    assert first != server_token  # the notebook's own token never leaves the notebook
    expires = float(notes[jd.TOKEN_EXPIRES_KEY])
    assert started + jd.TOKEN_LIFETIME - 120 < expires < time.time() + jd.TOKEN_LIFETIME + 120
    status, model = hub_user_model(jupyterhub, first)
    assert status == 200
    assert model["token_id"] == notes[jd.TOKEN_ID_KEY]
    assert set(model["scopes"]) == {
        f"custom:jobtunnel:connect!user={user}",
        f"read:users:name!user={user}",
        f"read:users:groups!user={user}",
    }
    # A forwarder with default settings takes the minted token, and not the notebook's own.
    assert asyncio.run(forwarder_decision(jupyterhub, user, first)).ok
    assert asyncio.run(forwarder_decision(jupyterhub, user, server_token)).code == "broad_token"

    # Kept while it has more than renew_before left: no new token at every cluster start.
    assert jd.ensure_token_secret(ns, kubeconfig=kubeconfig) == ns
    assert stored()[0] == first
    # Renewed when closer to its expiry than that; the old one is revoked at the hub.
    jd.ensure_token_secret(ns, kubeconfig=kubeconfig, renew_before=jd.TOKEN_LIFETIME + 3600)
    second, notes2 = stored()
    assert second != first
    assert notes2[jd.TOKEN_ID_KEY] != notes[jd.TOKEN_ID_KEY]
    assert hub_user_model(jupyterhub, first)[0] == 403
    assert hub_user_model(jupyterhub, second)[0] == 200

    # A hub without the server role's tokens!user refuses to mint: a clear error, no token shown.
    weak, _ = jupyterhub.create_token(user, scopes=["users:activity!user"])
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", weak)
    with pytest.raises(PermissionError, match=r"jupyterhub_config\.py") as refused:
        jd.ensure_token_secret(ns, kubeconfig=kubeconfig, renew_before=jd.TOKEN_LIFETIME + 3600)
    assert weak not in str(refused.value)
    assert stored()[0] == second  # nothing lost: the Secret keeps the last good token


def test_hub_config_and_z2jh_values_define_the_same_scope_and_roles() -> None:
    from traitlets.config import Config

    from tests.jupyterhub import SITE_CONFIG

    c = Config()
    exec(compile(SITE_CONFIG.read_text(), str(SITE_CONFIG), "exec"), {"get_config": lambda: c})  # noqa: S102
    roles = {r["name"]: r for r in c.JupyterHub.load_roles.get_value([])}
    values = yaml.safe_load((CONFIGS / "z2jh-values.yaml").read_text())["hub"]
    assert values["config"]["JupyterHub"]["custom_scopes"] == c.JupyterHub.custom_scopes
    assert set(values["loadRoles"]) == set(roles) == {"user", "server"}
    for name, role in values["loadRoles"].items():
        assert role["scopes"] == roles[name]["scopes"], name
    assert "custom:jobtunnel:connect!user" in roles["user"]["scopes"]
    assert jd.TUNNEL_SCOPES == ("custom:jobtunnel:connect!user",)
