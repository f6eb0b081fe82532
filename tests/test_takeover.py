"""Takeover needs the old session to be dead (issue 11, tenant isolation).

Whoever holds a user's token can claim any of that user's identities, so a claim of a
published identity is settled by a liveness challenge of the holder (``ping``/``pong``,
protocol v2; any frame from a v1 holder). Real components on both ends: the forwarder
and agents in-process on loopback, raw control channels for holders that misbehave on
purpose, and a TCP relay between an agent and the forwarder that can freeze or cut one
side, which is what a partition or a half-open connection looks like to the other side.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemons.agent import metrics as agent_metrics
from daemons.agent.session import AgentIdentity, AgentSession
from daemons.forwarder.sessions import LivenessChallenge, Session
from shared import protocol as p
from shared.config import HostPort
from shared.metrics import new_registry
from tests.harness import RunningForwarder, agent_settings, running_agent, wait_for
from tests.test_policy import (
    STEP,
    RawControl,
    expect_refusal,
    find,
    forwarder,
    metric,
    probe,
    tunnels,
    wait_closed,
)
from tests.test_tunnel import echo_roundtrip, echo_server

pytestmark = pytest.mark.anyio

POD = p.PodInfo(namespace="jupyter-alice", name="c-scheduler", uid="uid-1")
IDENTITY = "alice:pod:uid-1"
# A loaded 2-core machine adds scheduling delay on top of the bound, never less than it.
SLACK = 5.0


def claim(
    *services: str, instance_id: str = "thief", versions: tuple[int, ...] = (1, 2)
) -> p.Hello:
    """A hello for the victim's pod: what a stolen token lets anyone send."""
    return p.Hello(
        versions=versions,
        agent_version="thief",
        instance_id=instance_id,
        pod=POD,
        private_ip="127.0.0.1",
        services=tuple(p.ServiceSpec(name=s, port=1) for s in services),
    )


async def raw_holder(
    fw: RunningForwarder, stack: contextlib.AsyncExitStack[None], port: int, **hello_args: Any
) -> tuple[RawControl, dict[str, Any]]:
    """A published session of the victim's pod that answers nothing unless told to."""
    conn = await stack.enter_async_context(await probe(fw))
    control = await RawControl.open(conn)
    control.send(claim("scheduler", instance_id="holder", **hello_args))
    assert isinstance(await control.receive(), p.Welcome)
    await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
    control.send(p.Ready(services=("scheduler",)))
    (tunnel,) = await wait_for(lambda: fw.tunnels(), STEP, "the holder published")
    return control, tunnel


def holder_session(fw: RunningForwarder, session_id: str) -> Session:
    return next(s for s in fw.forwarder.registry if s.id == session_id)


# --- a TCP relay that can freeze (partition) or cut one side (half-open) ---------------------


@dataclass
class _Pair:
    downstream: SocketStream  # the agent's side
    upstream: SocketStream  # the forwarder's side
    cut: bool = False


@dataclass
class Relay:
    """Between an agent and the forwarder: ``freeze`` holds every byte both ways (a
    partition), ``cut_agent_side`` hangs up on the agents but leaves the forwarder's
    sockets open and silent (a half-open connection: the forwarder hears nothing)."""

    address: HostPort
    pairs: list[_Pair] = field(default_factory=list)
    thawed: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.thawed.set()

    def freeze(self) -> None:
        self.thawed = anyio.Event()

    def thaw(self) -> None:
        self.thawed.set()

    async def cut_agent_side(self) -> None:
        for pair in self.pairs:
            pair.cut = True
            await pair.downstream.aclose()
        self.pairs.clear()


@contextlib.asynccontextmanager
async def relay(target: HostPort) -> AsyncIterator[Relay]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    result = Relay(HostPort("127.0.0.1", port))
    silent: list[SocketStream] = []

    gone = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)

    async def pump(pair: _Pair, src: SocketStream, dst: SocketStream) -> None:
        with contextlib.suppress(*gone):
            while not pair.cut:
                data = await src.receive()
                await result.thawed.wait()
                if not pair.cut:
                    await dst.send(data)
        if not pair.cut:  # a cut tells the forwarder nothing, not even EOF
            with contextlib.suppress(*gone):
                await dst.send_eof()

    async def handle(downstream: SocketStream) -> None:
        upstream = await anyio.connect_tcp(target.host, target.port)
        pair = _Pair(downstream, upstream)
        result.pairs.append(pair)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, pair, downstream, upstream)
            tg.start_soon(pump, pair, upstream, downstream)
        # Cut on the agent's side: the forwarder's socket stays open, unread and unwritten.
        silent.append(upstream)

    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield result
        finally:
            tg.cancel_scope.cancel()
            for stream in silent:
                await stream.aclose()


def agent_metrics_of(session: AgentSession) -> tuple[dict[str, float], bytes]:
    registry = new_registry()
    agent_metrics.register(registry, session)
    body = generate_latest(registry)
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    return values, body


# --- 0. the challenge itself, without a network ----------------------------------------------


async def test_liveness_challenge_is_single_flight_and_bounded() -> None:
    asked: list[LivenessChallenge] = []
    holder = Session(id="h", user="alice", peer="?", mode="agent", probe=asked.append)
    first = holder.challenge_liveness(0.3)
    assert holder.challenge_liveness(0.3) is first  # a second claimant joins it
    assert asked == [first]  # one question for both
    with anyio.fail_after(STEP):
        assert await first.wait() is False  # nobody answered: dead at the deadline
    first.settle(True)  # a late answer changes nothing
    assert first.alive is False
    second = holder.challenge_liveness(0.3)  # after the deadline: a new question
    assert second is not first
    assert asked == [first, second]
    assert second.nonce != first.nonce
    assert p.NONCE_RE.fullmatch(second.nonce)
    second.settle(True)
    assert await second.wait() is True
    assert holder.challenge_liveness(0.3) is second  # answered: reused until its deadline


# --- 1. a live holder keeps its identity ----------------------------------------------------


async def test_stolen_token_cannot_take_over_a_live_session(tmp_path: Path) -> None:
    async with echo_server(b"V:") as port, forwarder(tmp_path) as fw:
        settings = agent_settings(fw, services=(("scheduler", port),))
        identity = AgentIdentity(instance_id="victim", pod=POD, private_ip="127.0.0.1")
        async with running_agent(settings, identity) as victim:
            (before,) = await tunnels(fw)
            assert before["identity"] == IDENTITY
            in_use = fw.forwarder.ports.in_use
            thief = await probe(fw)  # the victim's user and token
            async with thief, expect_refusal(fw, "identity-held", reason=IDENTITY) as refusal:
                control = await RawControl.open(thief)
                started = anyio.current_time()
                control.send(claim("scheduler", "dashboard"))
                error = await control.receive()
                refused_after = anyio.current_time() - started
                assert await control.read_to_end() == [], "nothing after the refusal"
                assert isinstance(error, p.Error)
                assert (error.code, error.fatal) == ("identity-held", True)
                assert IDENTITY in error.message
                assert victim.state.session_id in error.message
                assert "revoke" in error.message  # what to do about it
                await wait_closed(thief, "the thief's connection")
            assert refusal.event["session"] != victim.state.session_id
            assert refusal.event["holder"] == victim.state.session_id
            # The victim never noticed: same session, same addresses, same traffic.
            (after,) = await tunnels(fw)
            for key in ("id", "identity", "since", "services", "peer"):
                assert after[key] == before[key], key
            assert await echo_roundtrip(before["services"]["scheduler"]) == b"V:ping"
            assert victim.state.published
            assert victim.state.connects == 1
            assert victim.state.identity_conflicts == 0
            assert fw.forwarder.ports.in_use == in_use
            assert await metric(fw, "jobtunnel_forwarder_takeovers_total") == 0
            assert (
                await metric(fw, "jobtunnel_forwarder_liveness_challenges_total", outcome="alive")
                == 1
            )
            assert (
                await metric(fw, "jobtunnel_forwarder_sessions_ended_total", reason="identity-held")
                == 1
            )
    print(f"\nrefused claimant waited {refused_after:.3f}s for its answer")
    assert refused_after < SLACK  # a pong's round trip, not the bound


async def test_concurrent_claimants_share_one_challenge(tmp_path: Path) -> None:
    """Three claims at once: the holder is pinged once, answers once, all three refused."""
    async with (
        echo_server(b"H:") as port,
        forwarder(tmp_path, takeover_challenge_timeout=4.0) as fw,
        contextlib.AsyncExitStack() as stack,
    ):
        holder, tunnel = await raw_holder(fw, stack, port)
        claims = []
        for i in range(3):
            conn = await stack.enter_async_context(await probe(fw))
            claims.append(await RawControl.open(conn))
            claims[-1].send(claim("scheduler", instance_id=f"thief-{i}"))
        ping = await holder.receive()
        assert isinstance(ping, p.Ping), ping
        holder.send(p.Pong(nonce=ping.nonce))
        for control in claims:
            error = await control.receive()
            assert isinstance(error, p.Error), error
            assert error.code == "identity-held", error
        # One ping for the three: the next frame the holder gets answers its heartbeat.
        holder.send(p.Heartbeat(seq=1, sent_at=1.0))
        assert isinstance(await holder.receive(), p.HeartbeatAck)
        assert [t["id"] for t in fw.tunnels()] == [tunnel["id"]]
        assert await metric(fw, "jobtunnel_forwarder_refusals_total", kind="identity-held") == 3


async def test_v1_holder_alive_by_any_frame(tmp_path: Path) -> None:
    """A v1 agent knows no ping: a frame from it within the bound proves it alive."""
    async with (
        echo_server(b"H:") as port,
        forwarder(tmp_path) as fw,
        contextlib.AsyncExitStack() as stack,
    ):
        holder, tunnel = await raw_holder(fw, stack, port, versions=(1,))
        session = holder_session(fw, tunnel["id"])
        thief = await stack.enter_async_context(await probe(fw))
        control = await RawControl.open(thief)
        control.send(claim("scheduler"))
        await wait_for(lambda: session.challenge is not None, STEP, "the holder challenged")
        holder.send(p.Heartbeat(seq=1, sent_at=1.0))
        error = await control.receive()
        assert isinstance(error, p.Error), error
        assert error.code == "identity-held", error
        assert isinstance(await holder.receive(), p.HeartbeatAck)  # no ping to a v1 agent
        assert holder.pending == []


async def test_v1_holder_that_beat_recently_is_alive_without_a_frame_in_the_bound(
    tmp_path: Path,
) -> None:
    """A live v1 agent beats every 10 s, longer than the 5 s bound: a beat within 1.5
    intervals keeps it (the claimant is refused at once), so a live v1 tunnel is never lost."""
    async with (
        echo_server(b"H:") as port,
        forwarder(tmp_path, heartbeat_interval=10.0) as fw,
        contextlib.AsyncExitStack() as stack,
    ):
        holder, tunnel = await raw_holder(fw, stack, port, versions=(1,))
        holder.send(p.Heartbeat(seq=1, sent_at=1.0))
        assert isinstance(await holder.receive(), p.HeartbeatAck)
        thief = await stack.enter_async_context(await probe(fw))
        control = await RawControl.open(thief)
        started = anyio.current_time()
        control.send(claim("scheduler"))
        error = await control.receive()
        assert isinstance(error, p.Error), error
        assert error.code == "identity-held", error
        assert anyio.current_time() - started < 2.5  # at once, not after the 5 s bound
        assert [t["id"] for t in fw.tunnels()] == [tunnel["id"]]
        assert holder.pending == []


# --- 2. a silent holder is replaced within the bound ----------------------------------------


@pytest.mark.parametrize("versions", [(1, 2), (1,)], ids=["v2-no-pong", "v1-no-frame"])
async def test_silent_holder_replaced_within_the_bound(
    tmp_path: Path, versions: tuple[int, ...]
) -> None:
    bound = 5.0  # the default
    async with (
        echo_server(b"N:") as port,
        forwarder(tmp_path, heartbeat_interval=30.0) as fw,
        contextlib.AsyncExitStack() as stack,
    ):
        assert fw.forwarder.settings.takeover_challenge_timeout == bound
        holder, old = await raw_holder(fw, stack, port, versions=versions)
        settings = agent_settings(fw, services=(("scheduler", port),))
        identity = AgentIdentity(instance_id="new", pod=POD, private_ip="127.0.0.1")
        with capture_logs() as logs:
            started = anyio.current_time()
            async with running_agent(settings, identity) as agent:
                took = anyio.current_time() - started
                (tunnel,) = await tunnels(fw)
                assert tunnel["id"] == agent.state.session_id != old["id"]
                assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"N:ping"
                # The silent holder is told why it lost the identity, then cut.
                messages = await holder.read_to_end()
                if versions == (1, 2):
                    assert isinstance(messages[0], p.Ping), messages
                errors = [m for m in messages if isinstance(m, p.Error)]
                assert [e.code for e in errors] == ["replaced"], messages
        dead = find(logs, "holder failed the liveness challenge: replacing it")
        assert dead is not None
        assert dead["holder"] == old["id"]
        assert dead["waited"] >= bound - 0.1
        assert await metric(fw, "jobtunnel_forwarder_takeovers_total") == 1
        assert (
            await metric(fw, "jobtunnel_forwarder_liveness_challenges_total", outcome="dead") == 1
        )
    print(f"\nsilent {versions} holder replaced: agent published {took:.2f}s after start")
    assert bound - 0.1 <= took <= bound + SLACK


async def test_half_open_connection_reconnect_gets_in_within_the_bound(tmp_path: Path) -> None:
    """The agent's old connection died on its side only: the forwarder still holds it
    published and hears nothing. The agent's reconnect claims the identity, the old
    session fails the challenge, and the agent is back within the bound (plus backoff)."""
    async with (
        echo_server(b"R:") as port,
        forwarder(tmp_path, heartbeat_interval=30.0) as fw,
        relay(fw.ssh) as link,
    ):
        settings = agent_settings(link.address, fw.fingerprint, services=(("scheduler", port),))
        identity = AgentIdentity(instance_id="same", pod=POD, private_ip="127.0.0.1")
        async with running_agent(settings, identity) as agent:
            (first,) = await tunnels(fw)
            cut = anyio.current_time()
            await link.cut_agent_side()
            await wait_for(lambda: not agent.state.published, STEP, "the agent to notice")
            await wait_for(
                lambda: agent.state.published and agent.state.session_id != first["id"],
                STEP,
                "the agent published again",
            )
            back_after = anyio.current_time() - cut
            (tunnel,) = await tunnels(fw)
            assert tunnel["id"] == agent.state.session_id
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"R:ping"
            assert agent.state.identity_conflicts == 0  # its own ghost, not a conflict
        assert await metric(fw, "jobtunnel_forwarder_takeovers_total") == 1
    print(f"\nhalf-open reconnect: published again {back_after:.2f}s after the cut")
    assert back_after <= 5.0 + 1.0 + SLACK  # the bound, the backoff cap, the machine


# --- 3. a replaced agent comes back ---------------------------------------------------------


async def test_replaced_agent_retries_says_so_and_comes_back(tmp_path: Path) -> None:
    """A partitioned victim loses its identity to a thief; after the heal it is refused
    while the thief lives (loudly, in log and metrics), and gets it back when it leaves."""
    bound = 2.0
    async with (
        echo_server(b"V:") as victim_port,
        echo_server(b"T:") as thief_port,
        forwarder(tmp_path, heartbeat_interval=30.0, takeover_challenge_timeout=bound) as fw,
        relay(fw.ssh) as link,
    ):
        victim_settings = agent_settings(
            link.address, fw.fingerprint, services=(("scheduler", victim_port),)
        )
        with capture_logs() as logs:
            async with running_agent(
                victim_settings, AgentIdentity(instance_id="victim", pod=POD)
            ) as victim:
                (first,) = await tunnels(fw)
                link.freeze()
                thief_settings = agent_settings(fw, services=(("scheduler", thief_port),))
                async with running_agent(
                    thief_settings, AgentIdentity(instance_id="thief", pod=POD)
                ) as thief:
                    (stolen,) = await tunnels(fw)
                    assert stolen["id"] == thief.state.session_id != first["id"]
                    link.thaw()
                    await wait_for(
                        lambda: victim.state.identity_conflicts >= 2,
                        STEP,
                        "the victim told it was replaced, then refused on retry",
                    )
                    assert victim.state.identity_conflict
                    assert not victim.state.published
                    assert "another session holds" in (victim.ready_check() or "")
                    values, body = agent_metrics_of(victim)
                    assert values["jobtunnel_agent_identity_conflict"] == 1.0
                    assert values["jobtunnel_agent_identity_conflicts_total"] >= 2
                    promtool = shutil.which("promtool")
                    if promtool is not None:
                        lint = await anyio.run_process(
                            [promtool, "check", "metrics"], input=body, check=False
                        )
                        assert lint.returncode == 0, lint.stdout + lint.stderr
                    conflicts = [
                        e
                        for e in logs
                        if e.get("event", "").startswith("another session holds this agent")
                    ]
                    assert conflicts[0]["log_level"] == "error"
                    assert conflicts[0]["code"] == "replaced"
                    assert {e["code"] for e in conflicts[1:]} == {"identity-held"}
                    assert [t["id"] for t in await tunnels(fw)] == [stolen["id"]]
                # The thief said bye: the victim's next retry gets its identity back.
                await wait_for(lambda: victim.state.published, STEP, "the victim published again")
                (back,) = await tunnels(fw)
                assert back["id"] == victim.state.session_id not in (first["id"], stolen["id"])
                assert await echo_roundtrip(back["services"]["scheduler"]) == b"V:ping"
                values, _ = agent_metrics_of(victim)
                assert values["jobtunnel_agent_identity_conflict"] == 0.0
                assert victim.ready_check() is None
        assert find(logs, "identity back: this agent's session is published again") is not None
