"""Who may reach a tunnelled service: the per-tunnel source allow-list (issue 11).

Loopback aliases stand for pods: 127.0.0.0/8 is all ours, so ``local_host="127.0.5.2"`` is
"a pod at 127.0.5.2". The attack: a pod that is not the owner's connects to the listener the
owner's scheduler is published on. It must be closed before a byte reaches the job.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute
from structlog.testing import capture_logs

from daemons.reconciler import policy, sources
from daemons.reconciler.verify import UserRules
from shared.sources import AllowList
from tests.harness import (
    RunningForwarder,
    agent_settings,
    forwarder_settings,
    running_agent,
    wait_for,
)
from tests.test_config import FORWARDER, assert_config_error, run
from tests.test_policy import STEP, forwarder, refusals, tunnels

pytestmark = pytest.mark.anyio

# --- pure pieces ------------------------------------------------------------------------------


def test_allow_list_matches_addresses_not_spellings() -> None:
    allow = AllowList.parse(["10.1.0.0/16", "127.0.5.2", "fd00::/64"])
    assert allow.admits("10.1.200.3")
    assert allow.admits("::ffff:10.1.0.9")  # a dual-stack listener's view of an IPv4 peer
    assert allow.admits("127.0.5.2")
    assert not allow.admits("127.0.5.3")
    assert allow.admits("fd00::1%eth0")
    assert not allow.admits("fd00:0:0:1::1")
    for garbage in ("", "localhost", "10.1.0.0/16", "/tmp/sock"):
        assert not allow.admits(garbage), garbage
    assert not AllowList().admits("127.0.0.1")  # empty admits nobody


def test_bad_allowed_sources_setting_is_one_line_naming_it(tmp_path: Path) -> None:
    env = {
        "JOBTUNNEL_ALLOWED_SOURCES": "127.0.0.0/8,10.0.0.1/8",
        "JOBTUNNEL_TOKEN_FILE": str(tmp_path / "tokens"),
    }
    line = assert_config_error(run([FORWARDER], env, tmp_path), "JOBTUNNEL_ALLOWED_SOURCES")
    assert "10.0.0.1/8" in line
    assert "host bits" in line


def test_refused_peers_bound_fits_the_tunnel_status(tmp_path: Path) -> None:
    env = {"JOBTUNNEL_MAX_REFUSED_SOURCES": "65", "JOBTUNNEL_TOKEN_FILE": str(tmp_path / "t")}
    line = assert_config_error(run([FORWARDER], env, tmp_path), "JOBTUNNEL_MAX_REFUSED_SOURCES")
    assert "at most 64" in line


def test_default_allow_list_is_loopback_standalone_and_nothing_in_kubernetes(
    tmp_path: Path,
) -> None:
    """In a pod a sidecar proxy (Istio's 127.0.0.6) would hand every peer over from loopback."""
    base = forwarder_settings(tmp_path)
    assert base.source_allow_list == ("127.0.0.0/8", "::1/128")
    kube = dataclasses.replace(base, publish="kubernetes")
    assert kube.source_allow_list == ()
    explicit = dataclasses.replace(kube, allowed_sources=("10.0.0.0/8",))
    assert explicit.source_allow_list == ("10.0.0.0/8",)


def _pod(ns: str, name: str, ip: str, phase: str = "Running", **labels: str) -> dict[str, object]:
    return {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{name}", "labels": labels},
        "spec": {"containers": [{"name": "big", "image": "x" * 1000}]},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def test_reconciler_allow_list_is_the_owners_pods_the_operator_and_extra() -> None:
    pods = [
        _pod("jupyter-alice", "jupyter-alice", "10.0.0.5"),
        _pod("jupyter-alice", "old", "10.0.0.6", phase="Succeeded"),  # its IP is free again
        _pod("jupyter-bob", "jupyter-bob", "10.0.0.7"),
        _pod("dask-operator", "op", "10.0.9.1", **{"app.kubernetes.io/name": "dask-operator"}),
        {"metadata": {"namespace": "jupyter-alice", "name": "pending"}, "status": {}},
    ]
    operator = {"app.kubernetes.io/name": "dask-operator"}
    # Bob copies the operator's labels onto a pod of his: labels alone admit nothing.
    pods.append(_pod("jupyter-bob", "fake-op", "10.0.0.8", **operator))
    # A host-network pod of alice's: its address is the node's, never let in.
    host = _pod("jupyter-alice", "host", "10.1.0.1")
    host["status"]["hostIP"] = "10.1.0.1"  # type: ignore[index]
    pods.append(host)
    rules = UserRules("jupyter-{user}")
    got = sources.allowed_sources(
        "alice", pods, rules, operator, ["192.168.0.0/24"], operator_namespace="dask-operator"
    )
    assert got == ["10.0.0.5/32", "10.0.9.1/32", "192.168.0.0/24"]
    assert sources.allowed_sources("carol", pods, rules, {}) == []
    # A shared namespace (Zero-to-JupyterHub's default): the user label decides, and only on
    # pods nobody controls (the hub's bare pods): the Dask operator copies a DaskCluster's
    # labels, so bob's cluster could name alice.
    label = "hub.jupyter.org/username"
    forged = _pod("jhub", "bobs-worker", "10.0.1.3", **{label: "alice"})
    forged["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "controller": True}]  # type: ignore[index]
    shared = [
        _pod("jhub", "a", "10.0.1.1", **{label: "alice"}),
        _pod("jhub", "b", "10.0.1.2", **{label: "bob"}),
        forged,
    ]
    by_label = UserRules("", label=label)
    assert sources.allowed_sources("alice", shared, by_label, {}) == ["10.0.1.1/32"]
    assert sources.trim_pod(forged)["metadata"]["ownerReferences"] == [
        {"kind": "ReplicaSet", "controller": True}
    ]
    trimmed = sources.trim_pod(pods[0])
    assert "spec" not in trimmed
    assert sources.pod_ips(trimmed) == ["10.0.0.5"]


def test_refusals_reported_once_per_peer_and_session() -> None:
    tunnel: dict[str, object] = {
        "spec": {"sessionId": "s1"},
        "status": {
            "observedSessionId": "s1",
            "refusalsSessionId": "s1",
            "refusedSources": [{"address": "10.0.0.8", "count": 3}, {"address": "10.0.0.9"}],
            "refusedClaims": [{"address": "192.0.2.7"}],
            "reportedRefusals": ["10.0.0.8"],
        },
    }
    assert [key for key, _ in sources.unreported(tunnel)] == ["10.0.0.9", "claim:192.0.2.7"]
    assert sources.refused_addresses(tunnel) == ("10.0.0.8", "10.0.0.9", "claim:192.0.2.7")
    # A new session (the same Tunnel, taken over): the old session's refusals are not news...
    tunnel["spec"] = {"sessionId": "s2"}
    assert sources.unreported(tunnel) == []
    # ...its own are, all of them (nothing told for it yet).
    tunnel["status"]["refusalsSessionId"] = "s2"  # type: ignore[index]
    assert len(sources.unreported(tunnel)) == 3


# --- against the real forwarder ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def counting_echo() -> AsyncIterator[tuple[int, list[str]]]:
    """The job's service: echoes, and records every connection that reached it."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    reached: list[str] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        reached.append(str(stream.extra(SocketAttribute.remote_address)))
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    await stream.send(b"S:" + await stream.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield int(listener.extra(SocketAttribute.local_port)), reached
        finally:
            tg.cancel_scope.cancel()


async def attempt(address: str, source: str) -> bytes:
    """Connect from ``source``, send a request, read until the forwarder ends it (or echoes)."""
    host, _, port = address.rpartition(":")
    got = b""
    with anyio.fail_after(STEP):
        async with await anyio.connect_tcp(host, int(port), local_host=source) as stream:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(b"ping")
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while len(got) < 6:
                    got += await stream.receive()
    return got


@contextlib.asynccontextmanager
async def alice_scheduler(fw: RunningForwarder) -> AsyncIterator[tuple[str, list[str]]]:
    async with (
        counting_echo() as (port, reached),
        running_agent(agent_settings(fw, services=(("scheduler", port),))) as agent,
    ):
        await wait_for(lambda: agent.state.published, STEP, "alice published")
        (tunnel,) = await tunnels(fw)
        yield tunnel["services"]["scheduler"], reached


async def test_only_allowed_sources_reach_a_tunnelled_service(tmp_path: Path) -> None:
    """The pod at 127.0.5.2 is allowed; the pod at 127.0.5.3 is closed before a byte flows."""
    async with (
        forwarder(tmp_path, allowed_sources=("127.0.5.2/32",)) as fw,
        alice_scheduler(fw) as (address, reached),
    ):
        with capture_logs() as logs:
            assert await attempt(address, "127.0.5.3") == b""
        assert reached == [], "a refused peer's connection reached the job"
        assert await refusals(fw, "source") == 1
        (line,) = [e for e in logs if e.get("kind") == "source"]
        assert line["user"] == "alice"
        assert line["session"]
        assert line["peer"].startswith("127.0.5.3:")
        assert line["log_level"] == "warning"
        (entry,) = await tunnels(fw)
        assert [r["address"] for r in entry["refused_sources"]] == ["127.0.5.3"]

        assert await attempt(address, "127.0.5.2") == b"S:ping"
        assert len(reached) == 1
        assert await refusals(fw, "source") == 1


async def test_default_admits_loopback_only(tmp_path: Path) -> None:
    async with forwarder(tmp_path) as fw, alice_scheduler(fw) as (address, reached):
        assert await attempt(address, "127.0.5.9") == b"S:ping"
        assert len(reached) == 1


async def test_refused_peers_bounded_in_memory_and_log(tmp_path: Path) -> None:
    """200 refused connections from 50 pods: 8 remembered, a handful of log lines, bob fine."""
    async with (
        forwarder(
            tmp_path,
            allowed_sources=("127.0.5.2/32",),
            max_refused_sources=8,
            log_summary_interval=60.0,
        ) as fw,
        alice_scheduler(fw) as (address, reached),
    ):
        with capture_logs() as logs:
            for i in range(200):
                assert await attempt(address, f"127.0.6.{i % 50 + 1}") == b""
        assert reached == []
        assert await refusals(fw, "source") == 200
        (entry,) = await tunnels(fw)
        assert len(entry["refused_sources"]) == 8
        lines = [e for e in logs if e.get("kind") == "source"]
        assert len(lines) <= 50, len(lines)  # one per source and interval at most
        assert await attempt(address, "127.0.5.2") == b"S:ping"


def test_network_policy_opens_only_the_sessions_ports_to_the_owner() -> None:
    tunnel = {
        "metadata": {"name": "alice-1", "namespace": "jobtunnel", "uid": "t-uid"},
        "spec": {
            "user": "alice",
            "forwarder": {"podName": "fwd-0"},
            "services": [
                {"name": "scheduler", "port": 40001},
                {"name": "dashboard", "port": 40002},
            ],
        },
    }
    operator = {"app.kubernetes.io/name": "dask-kubernetes-operator"}
    wanted = policy.desired_policy(
        tunnel, UserRules("jupyter-{user}"), operator, ["10.8.0.0/24"], "dask-operator"
    )
    assert wanted is not None
    spec = wanted["spec"]
    assert spec["podSelector"] == {"matchLabels": {"jobtunnel.io/forwarder-pod": "fwd-0"}}
    (rule,) = spec["ingress"]
    assert [p["port"] for p in rule["ports"]] == [40001, 40002]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "jupyter-alice"}}},
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dask-operator"}},
            "podSelector": {"matchLabels": operator},
        },
        {"ipBlock": {"cidr": "10.8.0.0/24"}},
    ]
    (owner,) = wanted["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Tunnel", "t-uid")
    # A shared namespace: the user label, by the name and by the slug KubeSpawner writes.
    shared = policy.desired_policy(
        tunnel | {"spec": tunnel["spec"] | {"user": "Alice@Example.org"}},
        UserRules("", label="hub.jupyter.org/username"),
        {},
        [],
    )
    assert shared is not None
    (peer,) = shared["spec"]["ingress"][0]["from"]
    (expr,) = peer["podSelector"]["matchExpressions"]
    assert expr["values"] == ["alice-example-org---cfd44c4f"]  # the name is no label value
    # An annotation rule is no selector: the owner's current addresses instead, never narrower
    # than the forwarder's check; and with nothing at all, nothing opened, never an empty
    # "from" (which would admit everyone).
    annotated = UserRules("", annotation="hub/user")
    by_ip = policy.desired_policy(tunnel, annotated, {}, [], allowed=["10.0.0.5/32"])
    assert by_ip is not None
    assert by_ip["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.0.0.5/32"}}]
    closed = policy.desired_policy(tunnel, annotated, {}, [])
    assert closed is not None
    assert closed["spec"]["ingress"] == []
    assert policy.desired_policy(tunnel | {"spec": {"user": "alice"}}, UserRules(), {}, []) is None


def test_owner_index_finds_the_tunnels_a_pod_matters_to() -> None:
    by_ns = sources.OwnerIndex(UserRules("jupyter-{user}"))
    by_ns.set("jt/a1", "alice")
    by_ns.set("jt/a2", "alice")
    by_ns.set("jt/b1", "bob")
    assert by_ns.owners_of(_pod("jupyter-alice", "nb", "10.0.0.5")) == ["jt/a1", "jt/a2"]
    assert by_ns.owners_of(_pod("kube-system", "dns", "10.0.0.2")) == []
    by_ns.remove("jt/a1")
    by_ns.set("jt/b1", None)  # a Tunnel without a user is nobody's
    assert by_ns.owners_of(_pod("jupyter-alice", "nb", "10.0.0.5")) == ["jt/a2"]
    assert by_ns.owners_of(_pod("jupyter-bob", "nb", "10.0.0.6")) == []

    label = "hub.jupyter.org/username"
    shared = sources.OwnerIndex(UserRules("", label=label))
    shared.set("jt/x", "Alice@Example.org")
    pod = _pod("jhub", "nb", "10.0.1.1", **{label: "alice-example-org---cfd44c4f"})
    assert shared.owners_of(pod) == ["jt/x"]
    assert shared.owners_of(_pod("jhub", "nb2", "10.0.1.2", **{label: "bob"})) == []

    anyone = sources.OwnerIndex(UserRules("", annotation="hub/user"))
    anyone.set("jt/y", "alice")
    annotated = _pod("ns", "p", "10.0.2.1")
    annotated["metadata"]["annotations"] = {"hub/user": "alice"}  # type: ignore[index]
    assert anyone.owners_of(annotated) == ["jt/y"]
    assert anyone.owners_of(_pod("ns", "q", "10.0.2.2")) == []


def test_pod_index_reads_only_the_pods_a_rule_can_match() -> None:
    label = "hub.jupyter.org/username"
    pods = {
        "jupyter-alice/nb": _pod("jupyter-alice", "nb", "10.0.0.5"),
        "jupyter-bob/nb": _pod("jupyter-bob", "nb", "10.0.0.6"),
        "dask-operator/op": _pod("dask-operator", "op", "10.0.9.1"),
        "jhub/a": _pod("jhub", "a", "10.0.1.1", **{label: "alice"}),
    }
    by_ns = sources.PodIndex(UserRules("jupyter-{user}"))
    by_label = sources.PodIndex(UserRules("", label=label))
    for index in (by_ns, by_label):
        for pod in pods.values():
            index.update("ADDED", pod)
    names = [p["metadata"]["name"] for p in by_ns.candidates(pods, "alice", "dask-operator")]
    assert names == ["op", "nb"]
    got = by_label.candidates(pods, "alice", "")
    assert [p["metadata"]["namespace"] for p in got] == ["jhub"]
    relabelled = _pod("jhub", "a", "10.0.1.1", **{label: "bob"})
    pods["jhub/a"] = relabelled
    by_label.update("MODIFIED", relabelled)
    assert by_label.candidates(pods, "alice", "") == []
    by_ns.update("DELETED", pods.pop("jupyter-alice/nb"))
    assert by_ns.candidates(pods, "alice", "") == []
