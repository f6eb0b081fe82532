"""JupyterHub token authentication, end to end: a real hub, a real forwarder, real agents.

The forwarder runs in-process with a :class:`HubVerifier` pointed at the session's JupyterHub
(``tests.jupyterhub``); agents are the real :class:`AgentSession`; services are real TCP echo
servers (and, once, a real ``dask scheduler`` subprocess reached by a ``distributed.Client``).
Users and tokens are unique per test: the hub is shared by the whole pytest session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from structlog.testing import capture_logs

from daemons.agent.session import AgentIdentity, AgentSession, probe
from shared import hostkeys
from shared.auth import HubVerifier
from shared.config import HostPort, Secret
from shared.metrics import new_registry
from tests.harness import (
    Process,
    RunningForwarder,
    agent_settings,
    base_env,
    dask_scheduler_argv,
    forwarder_settings,
    free_port,
    get_tunnels,
    http_get,
    process,
    running_agent,
    running_forwarder,
    ssh_probe_connect,
    wait_for,
)
from tests.jupyterhub import JupyterHub, jupyterhub  # noqa: F401
from tests.test_tunnel import echo_roundtrip, echo_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Events = list[dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Helpers


@dataclass
class HubUser:
    name: str
    token: str
    token_id: str


@dataclass
class Hub:
    """The shared hub plus a per-test name suffix, so tests never see each other's users."""

    hub: JupyterHub
    suffix: str

    def user(self, base: str, *, admin: bool = False) -> HubUser:
        name = f"e2e-{base}-{self.suffix}"
        self.hub.create_user(name, admin=admin)
        token, token_id = self.hub.create_tunnel_token(name, note="jobtunnel e2e")
        return HubUser(name, token, token_id)

    async def revoke(self, user: HubUser) -> None:
        await anyio.to_thread.run_sync(self.hub.revoke_token, user.name, user.token_id)


@pytest.fixture
def hub(jupyterhub: JupyterHub) -> Iterator[Hub]:  # noqa: F811
    h = Hub(jupyterhub, uuid.uuid4().hex[:8])
    yield h
    if jupyterhub._paused:  # a failed test must never leave the shared hub frozen
        jupyterhub.resume()


@contextlib.asynccontextmanager
async def hub_forwarder(
    tmp_path: Path,
    hub: Hub,
    *,
    hub_timeout: float = 5.0,
    api_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[RunningForwarder]:
    """The real forwarder authenticating against the real hub; hub metrics on its /metrics."""
    registry = new_registry()
    api_url = api_url or hub.hub.api_url
    verifier = HubVerifier(api_url, timeout=hub_timeout, registry=registry)
    settings = forwarder_settings(
        tmp_path,
        auth="hub",
        token_file=None,
        hub_api_url=api_url,
        hub_timeout=hub_timeout,
        **overrides,
    )
    try:
        async with running_forwarder(settings, verifier, registry=registry) as fw:
            yield fw
    finally:
        with anyio.CancelScope(shield=True):
            await verifier.aclose()


def agent_for(fw: RunningForwarder, user: HubUser, port: int, **overrides: Any) -> Any:
    return agent_settings(
        fw,
        user=user.name,
        token=user.token,
        services=(("scheduler", port),),
        service_wait_timeout=120.0,
        **overrides,
    )


async def http(fw: RunningForwarder, path: str) -> tuple[int, str]:
    status, body = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}{path}")
    return status, body.decode(errors="replace")


async def tunnels(fw: RunningForwarder) -> list[dict[str, Any]]:
    return await anyio.to_thread.run_sync(get_tunnels, fw.admin)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None if absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m is None or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


async def login_refused(fw: RunningForwarder, user: str, token: str) -> asyncssh.PermissionDenied:
    """A raw SSH client's login must be refused; returns the client's exception."""
    with anyio.fail_after(60):
        try:
            conn = await ssh_probe_connect(fw.ssh, user, token, fw.fingerprint)
        except asyncssh.PermissionDenied as exc:
            return exc
    conn.close()
    raise AssertionError(f"login as {user!r} was accepted")


async def login_works(fw: RunningForwarder, user: str, token: str) -> bool:
    with anyio.fail_after(60):
        try:
            conn = await ssh_probe_connect(fw.ssh, user, token, fw.fingerprint)
        except asyncssh.PermissionDenied:
            return False
    conn.close()
    await conn.wait_closed()
    return True


def events(logs: Events, name: str, **fields: Any) -> Events:
    return [
        e for e in logs if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def auth_event(logs: Events, user: str) -> dict[str, Any]:
    """The one ``auth`` log line of a login attempt as ``user``.

    A name that never authenticated is logged as a digest (it may be a mistyped token).
    """
    digest = "unknown:" + hashlib.sha256(user.encode()).hexdigest()[:12]
    found = [e for e in events(logs, "auth") if e.get("user") in (user, digest)]
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------
# 1. A user's own token works, and her service is reachable through the tunnel


async def test_own_token_logs_in_and_service_works(tmp_path: Path, hub: Hub) -> None:
    alice = hub.user("alice")
    with capture_logs() as logs:
        async with (
            echo_server(b"alice:") as port,
            hub_forwarder(tmp_path, hub) as fw,
            running_agent(agent_for(fw, alice, port)) as agent,
        ):
            (tunnel,) = await tunnels(fw)
            assert tunnel["user"] == alice.name
            assert tunnel["id"] == agent.state.session_id
            assert tunnel["services"] == agent.state.addresses
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"alice:ping"
            # and a second, independent connection through the same tunnel
            assert await echo_roundtrip(tunnel["services"]["scheduler"], b"pong") == b"alice:pong"
    accepted = auth_event(logs, alice.name)
    assert (accepted["outcome"], accepted["code"], accepted["reason"]) == ("accept", "ok", "ok")
    assert events(logs, "authenticated", user=alice.name)
    assert fw.tunnels() == []


async def test_dask_scheduler_through_tunnel(tmp_path: Path, hub: Hub) -> None:
    from distributed import Client

    alice = hub.user("dask")
    sched_port, dash_port = free_port(), free_port()
    with process(
        dask_scheduler_argv(sched_port, dash_port), tmp_path / "scheduler.log", base_env()
    ) as scheduler:
        # the in-process agent does not wait for its services (its __main__ does): wait here
        for port in (sched_port, dash_port):
            await wait_for(
                lambda port=port: probe("127.0.0.1", port),
                timeout=120,
                what=f"the dask scheduler on port {port}",
            )
        async with (
            hub_forwarder(tmp_path, hub) as fw,
            running_agent(
                agent_settings(
                    fw,
                    user=alice.name,
                    token=alice.token,
                    services=(("scheduler", sched_port), ("dashboard", dash_port)),
                    service_wait_timeout=120.0,
                )
            ) as agent,
        ):
            (tunnel,) = await tunnels(fw)
            assert tunnel["user"] == alice.name
            address = tunnel["services"]["scheduler"]
            assert address == agent.state.addresses["scheduler"]
            with anyio.fail_after(120):
                async with Client(f"tcp://{address}", asynchronous=True, timeout="60s") as client:
                    # the code runs inside the real scheduler process, behind the tunnel
                    pid = await client.run_on_scheduler(os.getpid)
                    assert pid == scheduler.proc.pid
            status, body = await anyio.to_thread.run_sync(
                http_get, f"http://{tunnel['services']['dashboard']}/health"
            )
            assert (status, body.strip()) == (200, b"ok")


# --------------------------------------------------------------------------------------------
# 2. Refusals, each with its reason in the log


async def test_refusals_with_reasons(tmp_path: Path, hub: Hub) -> None:
    alice, bob = hub.user("alice"), hub.user("bob")
    root = hub.user("root", admin=True)
    revoked = hub.user("gone")
    await hub.revoke(revoked)
    garbage = uuid.uuid4().hex + uuid.uuid4().hex

    async with hub_forwarder(tmp_path, hub) as fw:
        # alice's token with bob's name
        with capture_logs() as logs:
            await login_refused(fw, bob.name, alice.token)
        e = auth_event(logs, bob.name)
        assert (e["outcome"], e["code"]) == ("reject", "user_mismatch"), e
        assert alice.name in e["reason"]

        # an admin's token with another user's name
        with capture_logs() as logs:
            await login_refused(fw, alice.name, root.token)
        e = auth_event(logs, alice.name)
        assert (e["outcome"], e["code"]) == ("reject", "user_mismatch"), e
        assert root.name in e["reason"]

        # a token the hub never issued
        with capture_logs() as logs:
            await login_refused(fw, bob.name, garbage)
        e = auth_event(logs, bob.name)
        assert (e["outcome"], e["code"]) == ("reject", "bad_token"), e
        assert "token" in e["reason"]

        # a revoked token, with its own user's name: refused and counted, but its log line
        # is folded into the summary (same source, same code, same interval: no log flood)
        with capture_logs() as logs:
            await login_refused(fw, revoked.name, revoked.token)
        assert not events(logs, "auth"), logs
        d = await fw.forwarder.authenticator.verifier.verify(revoked.name, revoked.token)
        assert (d.outcome.value, d.code) == ("reject", "bad_token"), d
        assert "revoked" in d.reason

        # every refusal is counted by reason; the rightful owners still get in
        _, text = await http(fw, "/metrics")
        assert (
            metric(text, "jobtunnel_auth_attempts_total", outcome="reject", reason="user_mismatch")
            == 2
        )
        assert (
            metric(text, "jobtunnel_auth_attempts_total", outcome="reject", reason="bad_token") == 2
        )
        assert await login_works(fw, alice.name, alice.token)
        assert await login_works(fw, root.name, root.token)


async def test_a_full_power_token_is_refused_and_the_agent_is_told_how_to_fix_it(
    tmp_path: Path, hub: Hub
) -> None:
    # What a job carried before: the user's whole token (what the hub gives by default, and
    # what a single-user server holds). Stolen from a job, it was the user's account.
    alice = hub.user("alice")
    full, _ = await anyio.to_thread.run_sync(hub.hub.create_token, alice.name)
    async with hub_forwarder(tmp_path, hub) as fw:
        with capture_logs() as logs:
            await login_refused(fw, alice.name, full)
        e = auth_event(logs, alice.name)
        assert (e["outcome"], e["code"]) == ("reject", "broad_token"), e
        assert "access:servers" in e["reason"] or "tokens" in e["reason"], e
        assert full not in str(logs)

        # The real agent hears why (an SSH auth banner) and says it in its log.
        async with anyio.create_task_group() as tg:
            settings = agent_for(fw, HubUser(alice.name, full, ""), free_port())
            session = AgentSession(
                settings, AgentIdentity(instance_id="x" * 16, private_ip="127.0.0.1"), Secret(full)
            )
            with capture_logs() as agent_logs:
                tg.start_soon(session.run, ["scheduler"])
                told = await wait_for(
                    lambda: events(agent_logs, "forwarder refused this token"),
                    what="the agent to log the forwarder's reason",
                )
                tg.cancel_scope.cancel()
        assert "custom:jobtunnel:connect!user=" + alice.name in told[0]["reason"]
        assert "ensure_token_secret" in told[0]["reason"]
        assert full not in str(agent_logs)
        assert not session.state.published

        # The tunnel-only token (what jobtunnel.dask mints) gets in.
        assert await login_works(fw, alice.name, alice.token)


class Pinned(asyncssh.SSHClient):
    """Trusts exactly the forwarder's host key (by fingerprint)."""

    def __init__(self, fingerprint: str) -> None:
        self._fingerprint = fingerprint

    def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
        return hostkeys.matches(key, self._fingerprint)


async def kbdint_connect(
    fw: RunningForwarder, user: str, token: str
) -> asyncssh.SSHClientConnection:
    """Keyboard-interactive only: answers the forwarder's one "JupyterHub token" prompt."""
    seen: list[str] = []

    class _Client(Pinned):
        def kbdint_auth_requested(self) -> str | None:
            return None if seen else ""  # one attempt only

        def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str, prompts: Any
        ) -> list[str]:
            seen.extend(prompt for prompt, _echo in prompts)
            return [token] * len(prompts)

    with anyio.fail_after(60):
        conn, _ = await asyncssh.create_connection(
            lambda: _Client(fw.fingerprint),
            fw.ssh.host,
            fw.ssh.port,
            username=user,
            known_hosts=([], [], []),
            client_keys=None,
            agent_path=None,
            config=[],
            preferred_auth="keyboard-interactive",
        )
    assert len(seen) == 1, seen
    assert "JupyterHub token" in seen[0], seen
    return conn


async def test_keyboard_interactive_login(tmp_path: Path, hub: Hub) -> None:
    alice, bob = hub.user("alice"), hub.user("bob")
    async with hub_forwarder(tmp_path, hub) as fw:
        with capture_logs() as logs:
            conn = await kbdint_connect(fw, alice.name, alice.token)
            conn.close()
            await conn.wait_closed()
            with pytest.raises(asyncssh.PermissionDenied):
                await kbdint_connect(fw, bob.name, alice.token)
        assert auth_event(logs, alice.name)["outcome"] == "accept"
        e = auth_event(logs, bob.name)
        assert (e["outcome"], e["code"]) == ("reject", "user_mismatch"), e

        # a stock client answering keyboard-interactive from its configured password
        # (how the agent falls back when password auth is not offered)
        with capture_logs() as logs, anyio.fail_after(60):
            conn = await asyncssh.connect(
                fw.ssh.host,
                fw.ssh.port,
                username=bob.name,
                password=bob.token,
                known_hosts=([], [], []),
                client_factory=lambda: Pinned(fw.fingerprint),
                client_keys=None,
                agent_path=None,
                config=[],
                preferred_auth="keyboard-interactive",
            )
            conn.close()
            await conn.wait_closed()
        assert auth_event(logs, bob.name)["outcome"] == "accept"


# --------------------------------------------------------------------------------------------
# 3. Revoking a token ends the live session within the revalidation interval


async def test_revocation_ends_live_session(tmp_path: Path, hub: Hub) -> None:
    alice = hub.user("alice")
    interval = 1.0
    with capture_logs() as logs:
        async with (
            echo_server() as port,
            hub_forwarder(tmp_path, hub, revalidate_interval=interval) as fw,
            running_agent(agent_for(fw, alice, port)) as agent,
        ):
            (tunnel,) = await tunnels(fw)
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"ping"
            # a revalidation with the valid token keeps the session
            await wait_for(
                lambda: (
                    events(logs, "session ended") == [] and _revalidations(fw, "accept", "ok") >= 1
                ),
                what="a successful revalidation",
            )
            assert agent.state.published

            mark = len(logs)
            await hub.revoke(alice)
            revoked_at = time.monotonic()
            await wait_for(lambda: fw.tunnels() == [], what="unpublish after revocation")
            elapsed = time.monotonic() - revoked_at
            print(f"\nrevocation -> unpublish: {elapsed:.2f}s (revalidate_interval={interval}s)")
            assert elapsed < interval + 10, elapsed  # bounded by the interval (+ slack for load)
            assert await tunnels(fw) == []

            # the agent was told why, by an error frame
            refused = await wait_for(
                lambda: events(logs[mark:], "refused by forwarder"),
                what="the agent's refusal log line",
            )
            assert refused[0]["reason"].startswith("auth-revoked: token no longer valid"), refused
            ended = await wait_for(
                lambda: events(logs[mark:], "session ended", user=alice.name),
                what="the session's end in the log",
            )
            assert ended[0]["reason"].startswith("token no longer valid"), ended

            # ... and its reconnects are refused: the token stays revoked
            await wait_for(
                lambda: [
                    e
                    for e in events(logs[mark:], "refused by forwarder")
                    if e["reason"].startswith("authentication failed")
                ],
                what="a refused reconnect",
            )
            attempts = events(logs[mark:], "auth", user=alice.name)
            assert attempts
            assert all(e["outcome"] == "reject" for e in attempts), attempts
            assert attempts[0]["code"] == "bad_token"
            assert not agent.state.published
            assert fw.tunnels() == []
            _, text = await http(fw, "/metrics")
            assert (
                metric(text, "jobtunnel_forwarder_sessions_ended_total", reason="token-revoked")
                == 1
            )
            assert (
                metric(
                    text, "jobtunnel_auth_revalidations_total", outcome="reject", reason="bad_token"
                )
                == 1
            )


def _revalidations(fw: RunningForwarder, outcome: str, reason: str) -> float:
    registry = fw.forwarder.authenticator.registry
    value = registry.get_sample_value(
        "jobtunnel_auth_revalidations_total", {"outcome": outcome, "reason": reason}
    )
    return value or 0.0


# --------------------------------------------------------------------------------------------
# 4. Hub unavailable: new logins refused, live sessions kept, readiness says so


async def survives_outage(
    fw: RunningForwarder, agent: AgentSession, tunnel: dict[str, Any], address: str
) -> None:
    """Two revalidations fail for want of the hub; the session stays published and carries."""
    before = _revalidations(fw, "unavailable", "hub_unavailable")
    await wait_for(
        lambda: _revalidations(fw, "unavailable", "hub_unavailable") >= before + 2,
        what="two revalidations during the outage",
    )
    assert agent.state.published
    assert [t["id"] for t in await tunnels(fw)] == [tunnel["id"]]
    assert await echo_roundtrip(address, b"still") == b"A:still"


async def test_hub_paused(tmp_path: Path, hub: Hub) -> None:
    alice, bob = hub.user("alice"), hub.user("bob")
    async with (
        echo_server(b"A:") as port,
        hub_forwarder(tmp_path, hub, hub_timeout=1.0, revalidate_interval=1.0) as fw,
        running_agent(agent_for(fw, alice, port)) as agent,
    ):
        (tunnel,) = await tunnels(fw)
        address = tunnel["services"]["scheduler"]
        assert await echo_roundtrip(address) == b"A:ping"
        assert (await http(fw, "/readyz"))[0] == 200

        with hub.hub.paused():
            with capture_logs() as logs:
                await login_refused(fw, bob.name, bob.token)
            e = auth_event(logs, bob.name)
            assert e["outcome"] == "unavailable", e
            assert "hub unavailable" in e["reason"], e
            assert e["code"] == "hub_unavailable"

            status, body = await http(fw, "/readyz")
            assert status == 503, body
            assert "token authority" in body, body
            _, text = await http(fw, "/metrics")
            assert metric(text, "jobtunnel_auth_hub_up") == 0
            assert (
                metric(
                    text,
                    "jobtunnel_auth_attempts_total",
                    outcome="unavailable",
                    reason="hub_unavailable",
                )
                == 1
            )

            # the live session survives failed revalidations
            await survives_outage(fw, agent, tunnel, address)
            assert (await http(fw, "/readyz"))[0] == 503

        # the hub answers again: logins work and the forwarder is ready
        await wait_for(lambda: login_works(fw, bob.name, bob.token), what="a login after resume")
        await wait_for(
            lambda: _status(fw, "/readyz", 200), what="/readyz 200 after the hub is back"
        )
        _, text = await http(fw, "/metrics")
        assert metric(text, "jobtunnel_auth_hub_up") == 1
        assert [t["id"] for t in await tunnels(fw)] == [tunnel["id"]]
        assert await echo_roundtrip(address, b"after") == b"A:after"


class HubRelay:
    """A TCP relay in front of the real hub that can go down (connection refused, every
    relayed connection cut) and come back on the same port: the hub process gone and back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        # Same port when it comes back (anyio sets SO_REUSEADDR).
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def relay(client: anyio.abc.SocketStream) -> None:
            async with (
                client,
                await anyio.connect_tcp(*self.target) as upstream,
                anyio.create_task_group() as pipes,
            ):

                async def pump(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                        async for chunk in a:
                            await b.send(chunk)
                    pipes.cancel_scope.cancel()

                pipes.start_soon(pump, client, upstream)
                pipes.start_soon(pump, upstream, client)

        with anyio.CancelScope() as self._scope:
            async with listener:
                task_status.started()
                await listener.serve(relay)

    async def up(self) -> None:
        assert self._tg is not None
        await self._tg.start(self._serve)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HubRelay]:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self.up()
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()


async def test_hub_down_and_back(tmp_path: Path, hub: Hub) -> None:
    """The hub's process gone (connections refused, open ones cut), then back on its address:
    new logins get "hub unavailable" at once, the live session keeps working, logins resume."""
    alice, bob = hub.user("alice"), hub.user("bob")
    hub_url = urllib.parse.urlsplit(hub.hub.api_url)
    relay = HubRelay((str(hub_url.hostname), int(hub_url.port or 80)))
    async with relay.running():
        api_url = hub_url._replace(netloc=f"127.0.0.1:{relay.port}").geturl()
        async with (
            echo_server(b"A:") as port,
            hub_forwarder(
                tmp_path, hub, api_url=api_url, hub_timeout=5.0, revalidate_interval=1.0
            ) as fw,
            running_agent(agent_for(fw, alice, port)) as agent,
        ):
            (tunnel,) = await tunnels(fw)
            address = tunnel["services"]["scheduler"]
            relay.down()
            started = anyio.current_time()
            with capture_logs() as logs:
                await login_refused(fw, bob.name, bob.token)
            refused_in = anyio.current_time() - started
            e = auth_event(logs, bob.name)
            assert (e["outcome"], e["code"]) == ("unavailable", "hub_unavailable"), e
            assert refused_in < 5.0, f"a refused connection is not a timeout: {refused_in:.2f}s"
            await wait_for(lambda: _status(fw, "/readyz", 503), what="/readyz 503, hub down")
            await survives_outage(fw, agent, tunnel, address)

            await relay.up()
            await wait_for(lambda: login_works(fw, bob.name, bob.token), what="login, hub back")
            await wait_for(lambda: _status(fw, "/readyz", 200), what="/readyz 200, hub back")
            assert [t["id"] for t in await tunnels(fw)] == [tunnel["id"]]
            print(f"\nhub down: a login refused in {refused_in * 1000:.0f} ms")


async def _status(fw: RunningForwarder, path: str, expected: int) -> bool:
    return (await http(fw, path))[0] == expected


# --------------------------------------------------------------------------------------------
# 5. The token never appears in logs, exceptions, metrics or /tunnels


async def test_token_never_appears(
    tmp_path: Path, hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = hub.user("alice"), hub.user("bob")
    garbage = "jt" + uuid.uuid4().hex + uuid.uuid4().hex
    secrets_ = [alice.token, bob.token, garbage]
    caplog.set_level(logging.DEBUG)
    exposed: list[str] = []
    with capture_logs() as logs:
        async with (
            echo_server() as port,
            hub_forwarder(tmp_path, hub, revalidate_interval=1.0) as fw,
            running_agent(agent_for(fw, alice, port)) as agent,
        ):
            (tunnel,) = await tunnels(fw)
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"ping"
            # failures: a real token with the wrong name, and a garbage token
            exposed.append(str(await login_refused(fw, alice.name, bob.token)))
            exposed.append(repr(await login_refused(fw, bob.name, garbage)))
            exposed.append(json.dumps(await tunnels(fw)))
            exposed.append((await http(fw, "/metrics"))[1])
            # revocation of the live session's token
            await hub.revoke(alice)
            await wait_for(lambda: fw.tunnels() == [], what="unpublish after revocation")
            await wait_for(lambda: events(logs, "refused by forwarder"), what="the agent's refusal")
            assert not agent.state.published
            exposed.append(json.dumps(await tunnels(fw)))
            exposed.append((await http(fw, "/metrics"))[1])
            exposed.append((await http(fw, "/readyz"))[1])
            exposed.append(repr(agent.state))
    assert events(logs, "auth", outcome="accept", user=alice.name)
    assert events(logs, "auth", outcome="reject", user=alice.name)
    # bob never logged in here: his name is logged as a digest (it might be a typed token)
    bob_logged = "unknown:" + hashlib.sha256(bob.name.encode()).hexdigest()[:12]
    assert events(logs, "auth", outcome="reject", user=bob_logged)
    assert events(logs, "session ended", user=alice.name)
    exposed.extend(repr(e) for e in logs)
    exposed.extend(json.dumps(e, default=repr) for e in logs)
    exposed.append(caplog.text)
    exposed.extend(r.getMessage() for r in caplog.records)
    for text in exposed:
        for secret in secrets_:
            assert secret not in text, text


# --------------------------------------------------------------------------------------------
# 6. The same through the console scripts: configuration, wiring and rendered JSON logs


async def test_processes_with_hub_auth(tmp_path: Path, hub: Hub) -> None:
    alice = hub.user("proc")
    garbage = "jt" + uuid.uuid4().hex
    key = hostkeys.load_or_generate(tmp_path / "host_key")
    ssh, web = HostPort("127.0.0.1", free_port()), HostPort("127.0.0.1", free_port())
    admin = HostPort("127.0.0.1", free_port())
    low = random.randrange(30000, 31900, 100)
    fw_env = base_env() | {
        "JOBTUNNEL_LISTEN": str(ssh),
        "JOBTUNNEL_HTTP": str(web),
        "JOBTUNNEL_ADMIN_HTTP": str(admin),
        "JOBTUNNEL_HOST_KEY": str(tmp_path / "host_key"),
        "JOBTUNNEL_AUTH": "hub",
        "JOBTUNNEL_HUB_API_URL": hub.hub.api_url,
        "JOBTUNNEL_HUB_TIMEOUT": "5",
        "JOBTUNNEL_REVALIDATE_INTERVAL": "1",
        "JOBTUNNEL_PORT_RANGE": f"{low}-{low + 99}",
        "JOBTUNNEL_SERVICE_HOST": "127.0.0.1",
        "JOBTUNNEL_HEARTBEAT_INTERVAL": "1",
        "JOBTUNNEL_LOG_LEVEL": "debug",
    }

    async def get(path: str) -> tuple[int, str]:
        where = admin if path == "/tunnels" else web
        with contextlib.suppress(OSError):
            status, body = await anyio.to_thread.run_sync(http_get, f"http://{where}{path}")
            return status, body.decode(errors="replace")
        return 0, ""

    async with echo_server(b"P:") as port:
        with process([str(BIN / "jobtunnel-forwarder")], tmp_path / "fw.log", fw_env) as fw:

            async def ready() -> bool:
                assert _alive(fw)
                return (await get("/readyz"))[0] == 200

            await wait_for(ready, what="the forwarder process ready", timeout=120)
            agent_env = base_env() | {
                "JOBTUNNEL_FORWARDER": str(ssh),
                "JOBTUNNEL_USER": alice.name,
                "JUPYTERHUB_API_TOKEN": alice.token,
                "JOBTUNNEL_HOST_KEY_FINGERPRINT": hostkeys.fingerprint(key),
                "JOBTUNNEL_SERVICES": f"scheduler={port}",
                "JOBTUNNEL_PRIVATE_IP": "127.0.0.1",
                "JOBTUNNEL_BACKOFF_INITIAL": "0.2",
                "JOBTUNNEL_BACKOFF_MAX": "1",
                "JOBTUNNEL_LOG_LEVEL": "debug",
            }
            with process([str(BIN / "jobtunnel-agent")], tmp_path / "agent.log", agent_env) as ag:

                async def published() -> list[dict[str, Any]]:
                    assert _alive(fw)
                    assert _alive(ag)
                    status, body = await get("/tunnels")
                    return json.loads(body) if status == 200 else []

                (tunnel,) = await wait_for(published, what="the tunnel", timeout=120)
                assert tunnel["user"] == alice.name
                assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"P:ping"
                _, text = await get("/metrics")
                assert metric(text, "jobtunnel_auth_hub_up") == 1  # the hub verifier is wired
                fp = hostkeys.fingerprint(key)
                with pytest.raises(asyncssh.PermissionDenied):
                    await ssh_probe_connect(ssh, alice.name, garbage, fp)

                await hub.revoke(alice)
                await wait_for(
                    lambda: _event(fw, "session ended", "token no longer valid"),
                    what="the forwarder ending the session",
                )
                assert json.loads((await get("/tunnels"))[1]) == []
                await wait_for(
                    lambda: _event(ag, "refused by forwarder", "auth-revoked"),
                    what="the agent told why",
                )
                await wait_for(
                    lambda: _event(ag, "refused by forwarder", "authentication failed"),
                    what="the agent's reconnect refused",
                )
                exposed = [(await get("/metrics"))[1], (await get("/tunnels"))[1]]
        exposed += [fw.log(), ag.log()]
    assert _event(fw, "auth", "ok")
    for text in exposed:
        assert alice.token not in text
        assert garbage not in text


BIN = Path(sys.executable).parent


def _alive(proc: Process) -> bool:
    if proc.proc.poll() is not None:
        raise AssertionError(f"{proc.argv[0]} exited: {proc.log()[-4000:]}")
    return True


def _event(proc: Process, name: str, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in proc.json_lines()
        if e.get("event") == name and reason in str(e.get("reason", ""))
    ]
