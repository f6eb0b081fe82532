"""The tunnel itself: agent and forwarder over one real SSH connection."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketListener

from daemons.agent.session import AgentIdentity
from shared import protocol as p
from tests.harness import (
    agent_settings,
    forwarder_settings,
    get_tunnels,
    running_agent,
    running_forwarder,
    wait_for,
    write_token_file,
)

pytestmark = pytest.mark.anyio

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}


@contextlib.asynccontextmanager
async def echo_server(tag: bytes = b"") -> AsyncIterator[int]:
    """A real TCP service standing in for a scheduler port: echoes, prefixed by ``tag``."""
    listener: SocketListener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    data = await stream.receive()
                    await stream.send(tag + data)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        finally:
            tg.cancel_scope.cancel()


async def echo_roundtrip(address: str, payload: bytes = b"ping") -> bytes:
    host, _, port = address.rpartition(":")
    with anyio.fail_after(20):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(payload)
            received = b""
            while len(received) < len(payload):
                received += await stream.receive()
            return received


async def test_service_reachable_through_tunnel_and_listed(tmp_path: Path) -> None:
    write_token_file(tmp_path / "tokens", TOKENS)
    async with (
        echo_server(b"S:") as sched_port,
        echo_server(b"D:") as dash_port,
        running_forwarder(forwarder_settings(tmp_path)) as fw,
        running_agent(
            agent_settings(fw, services=(("scheduler", sched_port), ("dashboard", dash_port))),
            AgentIdentity(
                instance_id="i-1",
                private_ip="10.1.2.3",
                job=p.JobInfo(
                    global_job_id="schedd.example#12.0#1700000000",
                    cluster_id=12,
                    proc_id=0,
                    schedd="schedd.example",
                ),
            ),
        ) as agent,
    ):
        assert fw.admin is not None
        tunnels = await anyio.to_thread.run_sync(get_tunnels, fw.admin)
        assert len(tunnels) == 1
        (tunnel,) = tunnels
        assert tunnel["user"] == "alice"
        assert tunnel["private_ip"] == "10.1.2.3"
        assert tunnel["job"]["global_job_id"] == "schedd.example#12.0#1700000000"
        assert tunnel["id"] == agent.state.session_id
        for key in (
            "id",
            "user",
            "job",
            "pod",
            "private_ip",
            "since",
            "last_heartbeat",
            "services",
        ):
            assert key in tunnel
        assert set(tunnel["services"]) == {"scheduler", "dashboard"}
        assert tunnel["services"] == agent.state.addresses
        assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"S:ping"
        assert await echo_roundtrip(tunnel["services"]["dashboard"]) == b"D:ping"
        await wait_for(lambda: fw.tunnels()[0]["last_heartbeat"] is not None, what="a heartbeat")
        await wait_for(lambda: agent.state.last_rtt is not None, what="a heartbeat ack")
    assert fw.tunnels() == []


async def test_bye_unpublishes_at_once(tmp_path: Path) -> None:
    write_token_file(tmp_path / "tokens", TOKENS)
    async with (
        echo_server() as port,
        running_forwarder(forwarder_settings(tmp_path, heartbeat_interval=30.0)) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),))) as agent,
    ):
        assert len(fw.tunnels()) == 1
        with anyio.fail_after(5):  # far below any heartbeat timeout (90 s here)
            await agent.bye("done")
            await wait_for(lambda: fw.tunnels() == [], what="unpublish after bye")


async def test_live_holder_keeps_its_identity_until_it_leaves(tmp_path: Path) -> None:
    """Two live agents claiming one pod: the first keeps it (it answers the liveness
    challenge); the second is refused, backs off and retries, and gets it once the first
    has gone. (Before the challenge existed the newest won at once.)"""
    write_token_file(tmp_path / "tokens", TOKENS)
    pod = p.PodInfo(namespace="jupyter-alice", name="c-scheduler", uid="uid-1")
    async with (
        echo_server(b"A:") as port_a,
        echo_server(b"B:") as port_b,
        running_forwarder(forwarder_settings(tmp_path)) as fw,
        running_agent(
            agent_settings(fw, services=(("scheduler", port_a),)),
            AgentIdentity(instance_id="a", pod=pod, private_ip="10.0.0.1"),
        ) as agent_a,
    ):
        (first,) = fw.tunnels()
        async with running_agent(
            agent_settings(fw, services=(("scheduler", port_b),)),
            AgentIdentity(instance_id="b", pod=pod, private_ip="10.0.0.2"),
            published=False,
        ) as agent_b:
            await wait_for(
                lambda: agent_b.state.identity_conflicts >= 2, what="B refused, and again on retry"
            )
            assert agent_b.state.identity_conflict
            assert "identity-held" in (agent_b.ready_check() or "")
            (tunnel,) = fw.tunnels()
            assert tunnel["id"] == first["id"] == agent_a.state.session_id
            assert tunnel["private_ip"] == "10.0.0.1"
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"A:ping"
            assert agent_a.state.connects == 1
            assert agent_a.state.identity_conflicts == 0
            assert agent_a.ready_check() is None

            await agent_a.bye("job done")
            await wait_for(lambda: agent_b.state.published, what="B published after A left")
            (tunnel,) = fw.tunnels()
            assert tunnel["id"] == agent_b.state.session_id != first["id"]
            assert tunnel["private_ip"] == "10.0.0.2"
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"B:ping"
            assert not agent_b.state.identity_conflict
            assert agent_b.ready_check() is None
