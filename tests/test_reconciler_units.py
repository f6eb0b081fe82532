"""Pure parts of the reconciler: slugs, verification rules, patches, settings, the work queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from daemons.reconciler import readiness, route, workers
from daemons.reconciler.queue import WorkQueue
from daemons.reconciler.settings import ReconcilerSettings
from daemons.reconciler.verify import NodeRules, UserRules, escape_slug, safe_slug, verify
from shared import config

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        # KubeSpawner's own test cases (kubespawner/tests/test_slugs.py).
        ("jupyter-alex", "jupyter-alex"),
        ("jupyter-Alex", "jupyter-alex---3a1c285c"),
        ("jupyter-üni", "jupyter-ni---a5aaf5dd"),
        ("endswith-", "endswith---165f1166"),
        ("user@email.com", "user-email-com---0925f997"),
        ("-start", "start---f587e2dc"),
        ("username--servername", "username-servername---d957f1de"),
        ("9z9", "x-9z9---224de202"),
    ],
)
def test_safe_slug_matches_kubespawner(name: str, slug: str) -> None:
    assert safe_slug(name) == slug


def test_escape_slug_legacy_scheme() -> None:
    assert escape_slug("alice") == "alice"
    assert escape_slug("Alice.B") == "-41lice-2e-42"


def pod(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "metadata": {
            "namespace": "jupyter-alice",
            "name": "c-scheduler-x",
            "uid": "u1",
            "labels": {"dask.org/cluster-name": "c", "dask.org/component": "scheduler"},
        },
        "spec": {"nodeName": "vk"},
    }
    base.update(overrides)
    return base


def tunnel(user: str = "alice", uid: str = "u1", ns: str = "jupyter-alice") -> dict[str, Any]:
    return {"spec": {"user": user, "pod": {"namespace": ns, "name": "c-scheduler-x", "uid": uid}}}


RULES = UserRules("jupyter-{user}")
NODES = NodeRules("vk")


def test_verify_accepts_good_claims() -> None:
    verdict = verify(tunnel(), pod(), None, RULES, NODES)
    assert verdict.ok
    assert verdict.cluster == "c"


@pytest.mark.parametrize(
    ("claim", "live", "reason"),
    [
        (tunnel(user="bob"), pod(), "WrongUser"),
        (tunnel(uid="other"), pod(), "UIDMismatch"),
        (tunnel(), None, "PodNotFound"),
        (tunnel(), pod(spec={"nodeName": "node-1"}), "NotOnVirtualNode"),
        (
            tunnel(),
            pod(metadata={"namespace": "jupyter-alice", "name": "c-scheduler-x", "uid": "u1"}),
            "NotDaskScheduler",
        ),
        ({"spec": {"user": "alice"}}, pod(), "NoPodClaim"),
    ],
)
def test_verify_refuses(claim: dict[str, Any], live: dict[str, Any] | None, reason: str) -> None:
    verdict = verify(claim, live, None, RULES, NODES)
    assert not verdict.ok
    assert verdict.reason == reason


def test_verify_label_rule_and_node_labels() -> None:
    rules = UserRules("", label="hub.jupyter.org/username")
    labelled = pod()
    labelled["metadata"]["labels"]["hub.jupyter.org/username"] = "alice"
    nodes = NodeRules(None, (("type", "virtual-kubelet"),))
    node = {"metadata": {"labels": {"type": "virtual-kubelet"}}}
    assert verify(tunnel(), labelled, node, rules, nodes).ok
    assert verify(tunnel(user="bob"), labelled, node, rules, nodes).reason == "WrongUser"
    assert verify(tunnel(), labelled, {"metadata": {}}, rules, nodes).reason == "NotOnVirtualNode"


SERVICE: dict[str, Any] = {
    "metadata": {"name": "c-scheduler", "namespace": "ns", "resourceVersion": "7"},
    "spec": {
        "selector": {"dask.org/cluster-name": "c", "dask.org/component": "scheduler"},
        "ports": [
            {"name": "tcp-comm", "port": 8786, "protocol": "TCP", "targetPort": "tcp-comm"},
            {"name": "http-dashboard", "port": 8787, "protocol": "TCP", "targetPort": 8787},
        ],
    },
}


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, to check what the API server will make of a patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


def forwarder(ip: str = "10.244.1.10", ready: str = "True") -> dict[str, Any]:
    return {
        "metadata": {"name": "fwd-0", "namespace": "jobtunnel", "uid": "f0"},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def test_endpoint_slice_routes_by_port_name_and_is_idempotent() -> None:
    service = {**SERVICE, "metadata": {**SERVICE["metadata"], "uid": "s1"}}
    by = route.RoutedBy("jobtunnel/t1", "ns", "c-scheduler-x", "u1")
    endpoint = route.forwarder_endpoint(forwarder())
    assert endpoint is not None
    ports = {"scheduler": 40001, "dashboard": 40002}
    wanted = route.desired_slice(service, endpoint, ports, by, "v1")
    assert wanted["apiVersion"] == "discovery.k8s.io/v1"
    meta = wanted["metadata"]
    assert (meta["name"], meta["namespace"]) == ("c-scheduler-jobtunnel", "ns")
    assert meta["labels"] == {
        "kubernetes.io/service-name": "c-scheduler",
        "endpointslice.kubernetes.io/managed-by": "reconciler.jobtunnel.io",
    }
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Service", "name": "c-scheduler", "uid": "s1"}
    ]
    assert wanted["addressType"] == "IPv4"
    assert wanted["endpoints"][0]["addresses"] == ["10.244.1.10"]
    assert wanted["endpoints"][0]["conditions"] == {"ready": True}
    # The Service's port names, the listener ports; nothing of the Service is copied otherwise.
    assert wanted["ports"] == [
        {"name": "tcp-comm", "port": 40001, "protocol": "TCP"},
        {"name": "http-dashboard", "port": 40002, "protocol": "TCP"},
    ]
    # As the API server returns it (defaults filled in): nothing to patch.
    stored = json.loads(json.dumps(wanted))
    stored["metadata"].update(resourceVersion="9", uid="x", generation=1)
    stored["endpoints"][0]["conditions"].update(serving=True, terminating=False)
    assert route.slice_patch(stored, wanted) is None
    # The forwarder pod goes not ready, then moves: a patch guarded by the resourceVersion.
    not_ready = route.forwarder_endpoint(forwarder(ready="False"))
    assert not_ready is not None
    patch = route.slice_patch(stored, route.desired_slice(service, not_ready, ports, by, "v1"))
    assert patch is not None
    assert patch["metadata"]["resourceVersion"] == "9"
    assert patch["endpoints"][0]["conditions"] == {"ready": False}
    moved = route.forwarder_endpoint(forwarder(ip="10.244.1.11"))
    assert moved is not None
    patch = route.slice_patch(stored, route.desired_slice(service, moved, ports, by, "v1"))
    assert patch is not None
    assert patch["endpoints"][0]["addresses"] == ["10.244.1.11"]
    assert route.routed_by(wanted) == by


def test_forwarder_endpoint_needs_a_routable_ip() -> None:
    assert route.forwarder_endpoint(None) is None
    assert route.forwarder_endpoint(forwarder(ip="")) is None
    assert route.forwarder_endpoint(forwarder(ip="127.0.0.1")) is None  # validation refuses it
    gone = forwarder()
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert route.forwarder_endpoint(gone) is None
    six = route.forwarder_endpoint(forwarder(ip="fd00::5"))
    assert six is not None
    assert six.ip == "fd00::5"


def test_slice_version_from_discovery() -> None:
    both = {"versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}]}
    old = {"versions": [{"groupVersion": "discovery.k8s.io/v1beta1", "version": "v1beta1"}]}
    assert route.choose_version(both) == "v1"
    assert route.choose_version(old) == "v1beta1"


def test_worker_env_set_and_restore() -> None:
    group: dict[str, Any] = {
        "kind": "DaskWorkerGroup",
        "metadata": {"resourceVersion": "3"},
        "spec": {"worker": {"spec": {"containers": [{"name": "worker", "image": "x"}]}}},
    }
    patch = workers.set_patch(group, "jobtunnel/t1", "tcp://10.0.0.5:8786")
    assert patch is not None
    after = apply_merge_patch(group, patch)
    env = after["spec"]["worker"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "DASK_SCHEDULER_ADDRESS", "value": "tcp://10.0.0.5:8786"}]
    assert workers.set_patch(after, "jobtunnel/t1", "tcp://10.0.0.5:8786") is None
    restored = apply_merge_patch(after, workers.restore_patch(after, "c", "ns"))
    assert restored["spec"] == group["spec"]

    # A Deployment carrying a record copied from its group restores the operator's address.
    deployment = {
        "kind": "Deployment",
        "metadata": {"annotations": after["metadata"]["annotations"]},
        "spec": {"template": {"spec": {"containers": [{"name": "worker", "env": env}]}}},
    }
    back = apply_merge_patch(deployment, workers.restore_patch(deployment, "c", "ns"))
    assert back["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "DASK_SCHEDULER_ADDRESS", "value": "tcp://c-scheduler.ns.svc.cluster.local:8786"}
    ]


def test_readiness_patch() -> None:
    virtual_kubelet = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    patch = readiness.ready_patch(virtual_kubelet, True)
    assert patch is not None
    assert [c["type"] for c in patch["status"]["conditions"]] == ["ContainersReady"]
    ready = {
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
            ]
        }
    }
    assert readiness.ready_patch(ready, True) is None
    down = readiness.ready_patch(ready, False)
    assert down is not None
    assert down["status"]["conditions"][0]["status"] == "False"


def test_settings_env_names_and_errors() -> None:
    env = {
        "KUBECONFIG": "/tmp/kc",
        "JOBTUNNEL_HTTP": "127.0.0.1:9000",
        "JOBTUNNEL_NAMESPACE": "jt",
        "JOBTUNNEL_VIRTUAL_NODE": "vk",
        "JOBTUNNEL_USER_NAMESPACE": "hub-{user}",
        "JOBTUNNEL_JOB_POLL_INTERVAL": "10",
        "JOBTUNNEL_LEASE_NAME": "l",
    }
    settings = config.load(ReconcilerSettings, environ=env)
    settings.check()
    assert settings.kubeconfig == Path("/tmp/kc")
    assert settings.http == config.HostPort("127.0.0.1", 9000)
    assert (settings.namespace, settings.virtual_node, settings.user_namespace) == (
        "jt",
        "vk",
        "hub-{user}",
    )
    assert settings.job_poll_interval == 10.0
    with pytest.raises(config.ConfigError, match="JOBTUNNEL_USER_NAMESPACE"):
        config.load(ReconcilerSettings, environ={"JOBTUNNEL_USER_NAMESPACE": "x-{name}"})
    with pytest.raises(config.ConfigError, match="JOBTUNNEL_VIRTUAL_NODE"):
        config.load(ReconcilerSettings, environ={}).check()


def test_example_config_loads() -> None:
    settings = config.load(
        ReconcilerSettings, config_file=REPO / "configs" / "reconciler.toml", environ={}
    )
    settings.check()


@pytest.mark.anyio
async def test_work_queue_deduplicates_and_defers_while_processing() -> None:
    queue = WorkQueue()
    queue.add("a")
    queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    key = await queue.get(wait=1)
    assert key == "a"
    queue.add("a")  # while processing: comes back after done()
    assert len(queue) == 1
    queue.done("a")
    assert len(queue) == 2
    assert await queue.get(wait=1) == "b"
    assert await queue.get(wait=1) == "a"
    with anyio.fail_after(2):
        assert await queue.get(wait=0.05) is None


def test_user_label_accepts_the_name_or_kubespawners_slug() -> None:
    rules = UserRules(label="hub.jupyter.org/username")
    assert rules.label_names("alice", "alice")
    assert rules.label_names(safe_slug("Alice@Example.org"), "Alice@Example.org")
    assert not rules.label_names("bob", "alice")
    assert not rules.label_names(None, "alice")
