"""The forwarder's SSH policy, probed by real SSH peers on loopback.

Every test starts the real forwarder in-process and talks to it the way a
hostile or confused peer would: asyncssh as a raw client (no jobtunnel logic),
raw bytes on the control channel, plain TCP that never authenticates, and
OpenSSH's own ``ssh`` client. Each refusal is checked three ways: the client
sees it, ``jobtunnel_forwarder_refusals_total{kind}`` counts it, and a
``refused`` log line names the user, the peer and the reason.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from asyncssh.packet import Boolean, String, UInt32
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemons.agent.session import AgentIdentity
from shared import protocol as p
from shared.auth import FailureLimiter
from tests.harness import (
    RunningForwarder,
    agent_settings,
    base_env,
    forwarder_settings,
    get_tunnels,
    http_get,
    process,
    running_agent,
    running_forwarder,
    ssh_probe_connect,
    wait_for,
    write_token_file,
)
from tests.test_tunnel import echo_roundtrip, echo_server

pytestmark = pytest.mark.anyio

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789"}
PEER_RE = r"127\.0\.0\.1:\d+"
STEP = 30.0  # deadline for one step; generous for a loaded 2-core machine


# --- helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def forwarder(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningForwarder]:
    write_token_file(tmp_path / "tokens", TOKENS)
    # Each test checks one log line per refusal: no summarising across its steps.
    overrides.setdefault("log_summary_interval", 0.001)
    async with running_forwarder(forwarder_settings(tmp_path, **overrides)) as fw:
        yield fw


async def connect(fw: RunningForwarder, user: str = "alice", **options: Any) -> Any:
    """An asyncssh client pinned to the forwarder's host key, with ``options`` on top."""
    host_key = asyncssh.read_public_key(f"{fw.host_key_path}.pub")
    defaults: dict[str, Any] = {
        "username": user,
        "password": TOKENS.get(user, "nope"),
        "known_hosts": ([host_key], [], []),
        "client_keys": None,
        "agent_path": None,
        "config": [],
        "preferred_auth": "password",
    }
    defaults.update(options)
    return await asyncssh.connect(fw.ssh.host, fw.ssh.port, **defaults)


async def probe(fw: RunningForwarder, user: str = "alice") -> asyncssh.SSHClientConnection:
    return await ssh_probe_connect(fw.ssh, user, TOKENS[user], fw.fingerprint)


def local_peer(conn: asyncssh.SSHClientConnection) -> str:
    host, port = conn.get_extra_info("sockname")[:2]
    return f"{host}:{port}"


async def scrape(fw: RunningForwarder) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The forwarder's ``/metrics`` over HTTP, as {(sample, labels): value}."""
    status, body = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


async def metric(fw: RunningForwarder, name: str, **labels: str) -> float:
    return (await scrape(fw)).get((name, tuple(sorted(labels.items()))), 0.0)


async def refusals(fw: RunningForwarder, kind: str) -> float:
    return await metric(fw, "jobtunnel_forwarder_refusals_total", kind=kind)


async def tunnels(fw: RunningForwarder) -> list[dict[str, Any]]:
    assert fw.admin is not None  # standalone: /tunnels is on the admin listener
    return await anyio.to_thread.run_sync(get_tunnels, fw.admin)


LogEntry = MutableMapping[str, Any]


def find(logs: list[LogEntry], event: str, **match: Any) -> LogEntry | None:
    for entry in logs:
        if entry.get("event") == event and all(entry.get(k) == v for k, v in match.items()):
            return entry
    return None


@dataclass
class Refusal:
    logs: list[LogEntry] = field(default_factory=list)
    event: LogEntry = field(default_factory=dict)


@contextlib.asynccontextmanager
async def expect_refusal(
    fw: RunningForwarder, kind: str, *, user: str | None = "alice", reason: str = ""
) -> AsyncIterator[Refusal]:
    """The block must cause one more ``kind`` refusal, logged with user, peer and reason."""
    before = await refusals(fw, kind)
    result = Refusal()
    with capture_logs() as logs:
        result.logs = logs
        yield result
        result.event = await wait_for(
            lambda: find(logs, "refused", kind=kind), STEP, f"a logged {kind!r} refusal"
        )
    assert result.event["log_level"] == "warning"
    assert result.event["user"] == user
    assert re.fullmatch(PEER_RE, result.event["peer"]), result.event
    assert reason in result.event["reason"], result.event
    assert result.event["reason"]
    assert len([e for e in logs if e.get("event") == "refused" and e["kind"] == kind]) == 1
    after = await wait_for(
        lambda: _increased(fw, kind, before), STEP, f"refusals_total{{kind={kind!r}}} to grow"
    )
    assert after == before + 1


async def _increased(fw: RunningForwarder, kind: str, before: float) -> float:
    now = await refusals(fw, kind)
    return now if now > before else 0.0


class RawControl:
    """The control channel driven by hand: raw bytes out, decoded frames in."""

    def __init__(self, writer: asyncssh.SSHWriter[bytes], reader: asyncssh.SSHReader[bytes]):
        self.writer = writer
        self.reader = reader
        self.decoder = p.FrameDecoder()
        self.pending: list[p.Message] = []

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection) -> RawControl:
        writer, reader, _ = await conn.open_session(subsystem="jobtunnel", encoding=None)
        return cls(writer, reader)

    def send(self, message: p.Message) -> None:
        self.writer.write(p.encode(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def receive(self) -> p.Message:
        with anyio.fail_after(STEP):
            while not self.pending:
                data = await self.reader.read(65536)
                assert data, "control channel closed while waiting for a message"
                self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    async def read_to_end(self) -> list[p.Message]:
        """Every frame until the forwarder closes the channel (or the connection)."""
        messages = list(self.pending)
        with anyio.fail_after(STEP):
            while True:
                try:
                    data = await self.reader.read(65536)
                except (asyncssh.Error, ConnectionError):
                    break
                if not data:
                    break
                messages.extend(self.decoder.feed(data))
        return messages


def hello(*services: str, instance_id: str = "raw-1") -> p.Hello:
    return p.Hello(
        versions=p.PROTOCOL_VERSIONS,
        agent_version="raw-test",
        instance_id=instance_id,
        private_ip="127.0.0.1",
        services=tuple(p.ServiceSpec(name=s, port=1) for s in services),
    )


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


async def wait_closed(conn: asyncssh.SSHClientConnection, what: str) -> None:
    with anyio.move_on_after(STEP):
        await conn.wait_closed()
        return
    raise AssertionError(f"timed out after {STEP}s waiting for {what} to close")


# --- 1. what a session may not ask for -------------------------------------------------------


SESSION_REQUESTS = [
    pytest.param("shell", {}, id="shell"),
    pytest.param("exec", {"command": "id"}, id="exec"),
    pytest.param("pty", {"term_type": "xterm", "subsystem": "jobtunnel"}, id="pty"),
    pytest.param("subsystem", {"subsystem": "sftp"}, id="sftp-subsystem"),
]


@pytest.mark.parametrize(("kind", "options"), SESSION_REQUESTS)
async def test_session_request_refused(tmp_path: Path, kind: str, options: dict[str, Any]) -> None:
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        peer = local_peer(conn)
        async with conn, expect_refusal(fw, kind) as refusal:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_session(**options)
        assert refusal.event["peer"] == peer
        assert fw.tunnels() == []


@pytest.mark.parametrize("first", ["control", "forward"])
async def test_second_control_channel_refused(tmp_path: Path, first: str) -> None:
    """One control channel per connection, and only before any forward."""
    reason = "only one control channel" if first == "control" else "before any forward"
    async with echo_server() as port, forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn:
            if first == "control":
                await RawControl.open(conn)
            else:
                await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            async with expect_refusal(fw, "subsystem", reason=reason):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await RawControl.open(conn)


async def test_run_command_refused(tmp_path: Path) -> None:
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn, expect_refusal(fw, "exec", reason="no commands") as refusal:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("id")
        assert refusal.event["command"] == "id"


async def test_env_refused(tmp_path: Path) -> None:
    """asyncssh sends ``env`` without asking for a reply, then the subsystem request."""
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn:
            async with expect_refusal(fw, "env", reason="FOO"):
                writer, _, _ = await conn.open_session(
                    env={"FOO": "bar"}, subsystem="jobtunnel", encoding=None
                )
            # Asked with want-reply, the refusal is visible on the wire too.
            async with expect_refusal(fw, "env", reason="LD_PRELOAD"):
                request = writer.channel._make_request(b"env", String("LD_PRELOAD"), String("x"))
                assert await request is False


async def test_x11_forwarding_refused(tmp_path: Path) -> None:
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn, expect_refusal(fw, "x11"):
            with pytest.raises(asyncssh.ChannelOpenError, match="X11"):
                await conn.open_session(
                    subsystem="jobtunnel",
                    x11_forwarding=True,
                    x11_display="127.0.0.1:0",
                    x11_auth_path=str(tmp_path / "no-xauthority"),
                )


async def test_agent_forwarding_refused(tmp_path: Path) -> None:
    """``-A``-style agent forwarding: asked without want-reply, and with it."""
    async with forwarder(tmp_path) as fw:
        conn = await connect(fw, agent_forwarding=True, agent_path=str(tmp_path / "agent.sock"))
        async with conn:
            async with expect_refusal(fw, "agent-forwarding"):
                writer, _, _ = await conn.open_session(subsystem="jobtunnel", encoding=None)
            async with expect_refusal(fw, "agent-forwarding"):
                request = writer.channel._make_request(b"auth-agent-req@openssh.com")
                assert await request is False


async def test_raw_channel_requests_refused_with_reply(tmp_path: Path) -> None:
    """pty-req and x11-req as bare requests with want-reply: each answered with a failure."""
    requests: list[tuple[str, bytes, tuple[bytes, ...]]] = [
        ("pty", b"pty-req", (String("xterm"), *(UInt32(0),) * 4, String(b"\x00"))),
        (
            "x11",
            b"x11-req",
            (Boolean(False), String("MIT-MAGIC-COOKIE-1"), String("00"), UInt32(0)),
        ),
    ]
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, subsystem="jobtunnel")
            for kind, request, args in requests:
                async with expect_refusal(fw, kind):
                    assert await chan._make_request(request, *args) is False
            chan.close()


@pytest.mark.parametrize("target", ["service", "forwarder-http", "forwarder-ssh"])
async def test_direct_tcpip_refused(tmp_path: Path, target: str) -> None:
    """A job must never reach into the cluster: not a service, not the forwarder itself."""
    async with echo_server() as echo_port, forwarder(tmp_path) as fw:
        port = {"service": echo_port, "forwarder-http": fw.http.port, "forwarder-ssh": fw.ssh.port}
        conn = await probe(fw)
        async with conn, expect_refusal(fw, "direct-tcpip", reason="into the cluster") as refusal:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", port[target])
        assert refusal.event["dest"] == f"127.0.0.1:{port[target]}"


async def test_direct_tcpip_reaches_nothing(tmp_path: Path) -> None:
    """The refused channel never touched the target: it saw no connection at all."""
    connections = 0
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def count(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.aclose()

    port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    async with anyio.create_task_group() as tg, forwarder(tmp_path) as fw:
        tg.start_soon(listener.serve, count)
        conn = await probe(fw)
        async with conn:
            for _ in range(3):
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection("127.0.0.1", port)
            # The connection survives refusals; a plain forward still works afterwards.
            await conn.forward_remote_port("scheduler", 0, "127.0.0.1", 1)
        assert connections == 0
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["direct-streamlocal", "streamlocal-forward"])
async def test_unix_socket_forwarding_refused(tmp_path: Path, kind: str) -> None:
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn, expect_refusal(fw, kind, reason="unix socket"):
            if kind == "direct-streamlocal":
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_unix_connection("/run/something.sock")
            else:
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_path(str(tmp_path / "l.sock"), "/run/x.sock")
        assert not (tmp_path / "l.sock").exists()


async def test_unknown_service_refused(tmp_path: Path) -> None:
    async with forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn, expect_refusal(fw, "service", reason="'postgres' is not allowed"):
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("postgres", 0, "127.0.0.1", 1)
        assert fw.tunnels() == []


async def test_service_not_announced_in_hello_refused(tmp_path: Path) -> None:
    async with echo_server(b"S:") as port, forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn:
            control = await RawControl.open(conn)
            control.send(hello("scheduler"))
            welcome = await control.receive()
            assert isinstance(welcome, p.Welcome)
            async with expect_refusal(fw, "service", reason="not announced"):
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port("dashboard", 0, "127.0.0.1", port)
            # The announced one is still granted, and works once ready.
            await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            control.send(p.Ready(services=("scheduler",)))
            await wait_for(lambda: fw.tunnels(), STEP, "the session published")
            (tunnel,) = await tunnels(fw)
            assert set(tunnel["services"]) == {"scheduler"}
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"S:ping"


async def test_same_service_twice_refused(tmp_path: Path) -> None:
    async with echo_server(b"S:") as port, forwarder(tmp_path) as fw:
        conn = await probe(fw)
        async with conn:
            await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            async with expect_refusal(fw, "service", reason="already forwarded"):
                with pytest.raises(asyncssh.ChannelListenError):
                    await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            await wait_for(lambda: fw.tunnels(), STEP, "the plain session published")
            (tunnel,) = await tunnels(fw)
            assert tunnel["mode"] == "ssh"
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"S:ping"


# --- 2. authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "token"),
    [
        pytest.param("alice", "wrong-token-0123456789", id="wrong-token"),
        pytest.param("bob", TOKENS["alice"], id="alice-token-as-bob"),
    ],
)
async def test_bad_token_refused(tmp_path: Path, user: str, token: str) -> None:
    async with forwarder(tmp_path) as fw:
        before = await metric(
            fw, "jobtunnel_auth_attempts_total", outcome="reject", reason="bad_token"
        )
        with capture_logs() as logs:
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, user, password=token)
            entry = await wait_for(lambda: find(logs, "auth", outcome="reject"), STEP, "auth log")
        assert entry["user"] == user
        assert entry["peer"] == "127.0.0.1"
        assert entry["reason"]
        assert token not in repr(logs)
        after = await metric(
            fw, "jobtunnel_auth_attempts_total", outcome="reject", reason="bad_token"
        )
        assert after == before + 1
        assert len(fw.forwarder.registry) == 0


async def test_public_key_auth_not_offered(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with forwarder(tmp_path) as fw:
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(fw, client_keys=[key], password=None, preferred_auth="publickey")
        # OpenSSH lists what the server offers when it gives up.
        _, ssh = openssh_binaries()
        argv = [
            ssh,
            *openssh_options(fw, tmp_path),
            "-o",
            "BatchMode=yes",
            "-o",
            "PreferredAuthentications=publickey",
            "-N",
            "alice@127.0.0.1",
        ]
        with process(argv, tmp_path / "ssh-pubkey.log", openssh_env(tmp_path)) as proc:
            await wait_for(lambda: proc.proc.poll() is not None, STEP, "ssh to give up")
            assert proc.proc.returncode != 0
            text = proc.log()
        offered = re.search(r"Permission denied \(([^)]*)\)", text)
        assert offered is not None, text
        assert set(offered.group(1).split(",")) == {"password", "keyboard-interactive"}


async def test_keyboard_interactive_with_token(tmp_path: Path) -> None:
    async with echo_server(b"K:") as port, forwarder(tmp_path) as fw:
        conn = await connect(fw, preferred_auth="keyboard-interactive")
        async with conn:
            await conn.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            await wait_for(lambda: fw.tunnels(), STEP, "the kbdint session published")
            (tunnel,) = await tunnels(fw)
            assert tunnel["user"] == "alice"
            assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"K:ping"
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(fw, preferred_auth="keyboard-interactive", password="wrong-token-12345")


async def test_failure_limit_refuses_quickly(tmp_path: Path) -> None:
    async with forwarder(tmp_path, auth_max_failures=3) as fw:
        # The harness builds a default limiter; apply the configured one as __main__ does.
        settings = fw.forwarder.settings
        fw.forwarder.authenticator.limiter = FailureLimiter(
            max_failures=settings.auth_max_failures, window=settings.auth_failure_window
        )
        for _ in range(settings.auth_max_failures):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, "bob", password="guess-0123456789")
        before = await metric(fw, "jobtunnel_auth_rate_limited_total", key="user-source")
        with capture_logs() as logs:
            started = anyio.current_time()
            # Even the right token is refused now, without asking the token authority.
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, "bob")
            elapsed = anyio.current_time() - started
            entry = await wait_for(lambda: find(logs, "auth", code="rate_limited"), STEP, "log")
        assert entry["user"] == "bob"
        assert entry["peer"] == "127.0.0.1"
        assert "too many failures for this user from 127.0.0.1" in entry["reason"]
        assert elapsed < STEP
        after = await metric(fw, "jobtunnel_auth_rate_limited_total", key="user-source")
        assert after == before + 1
        assert len(fw.forwarder.registry) == 0


# --- 3. protocol abuse on the control channel ------------------------------------------------


ABUSE = [
    pytest.param(frame(b'{"type": "hello", '), "bad-json", id="bad-json"),
    pytest.param((p.MAX_FRAME_SIZE + 1).to_bytes(4, "big"), "frame-too-large", id="oversized"),
    pytest.param(frame(b'{"type": "launch"}'), "unknown-type", id="unknown-type"),
    pytest.param(
        frame(b'{"type":"hello","versions":"1","agent_version":"x","instance_id":"y"}'),
        "bad-field",
        id="wrong-field-type",
    ),
    pytest.param(p.encode(p.Ready()), "unexpected-message", id="ready-before-hello"),
]


@pytest.mark.parametrize(("data", "code"), ABUSE)
async def test_protocol_abuse_gets_error_and_close(tmp_path: Path, data: bytes, code: str) -> None:
    async with (
        echo_server(b"S:") as port,
        forwarder(tmp_path) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),))) as agent,
    ):
        (good,) = await tunnels(fw)
        before = await metric(fw, "jobtunnel_forwarder_protocol_errors_total", code=code)
        conn = await probe(fw, "bob")
        peer = local_peer(conn)
        async with conn:
            async with expect_refusal(fw, "protocol", user="bob") as refusal:
                control = await RawControl.open(conn)
                control.send_raw(data)
                messages = await control.read_to_end()
            assert refusal.event["peer"] == peer
            assert refusal.event["code"] == code
            errors = [m for m in messages if isinstance(m, p.Error)]
            assert [e.code for e in errors] == [code], messages
            assert errors[0].fatal
            await wait_closed(conn, "the abuser's connection")
        after = await metric(fw, "jobtunnel_forwarder_protocol_errors_total", code=code)
        assert after == before + 1
        # The other session never noticed.
        assert await echo_roundtrip(good["services"]["scheduler"]) == b"S:ping"
        assert [t["id"] for t in await tunnels(fw)] == [good["id"]]
        assert agent.state.connects == 1
        assert agent.state.published


# --- 4. limits -------------------------------------------------------------------------------


async def test_sessions_per_user_limit_but_takeover_allowed(tmp_path: Path) -> None:
    # Heartbeats every 30 s: the old session is found dead by the liveness challenge the
    # reconnect triggers, not by its heartbeat deadline.
    async with (
        echo_server(b"S:") as port,
        forwarder(tmp_path, max_sessions_per_user=1, heartbeat_interval=30.0) as fw,
    ):
        # An old session of identity "i-old", published, that answers nothing (think: a
        # half-dead connection whose agent is already reconnecting).
        old = await probe(fw)
        async with old:
            control = await RawControl.open(old)
            control.send(hello("scheduler", instance_id="i-old"))
            assert isinstance(await control.receive(), p.Welcome)
            await old.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            control.send(p.Ready(services=("scheduler",)))
            await wait_for(lambda: fw.tunnels(), STEP, "the old session published")

            # A second identity of the same user: over the limit.
            other = await probe(fw)
            async with other, expect_refusal(fw, "session-limit", reason="limit 1"):
                second = await RawControl.open(other)
                second.send(hello("scheduler", instance_id="i-other"))
                messages = await second.read_to_end()
                assert [type(m) for m in messages] == [p.Error], messages
                (error,) = messages
                assert isinstance(error, p.Error)
                assert error.code == "session-limit"
                assert "limit 1" in error.message
                assert error.fatal
                await wait_closed(other, "the over-limit connection")

            # The same identity reconnecting (a real agent) takes over once the old session
            # fails its liveness challenge: allowed over the limit, and within the bound.
            settings = agent_settings(fw, services=(("scheduler", port),))
            started = anyio.current_time()
            async with running_agent(settings, AgentIdentity(instance_id="i-old")) as agent:
                bound = fw.forwarder.settings.takeover_challenge_timeout
                assert anyio.current_time() - started < bound + STEP / 3
                await wait_closed(old, "the replaced connection")
                (tunnel,) = await tunnels(fw)
                assert tunnel["id"] == agent.state.session_id
                assert tunnel["identity"] == "alice:instance:i-old"
                assert await echo_roundtrip(tunnel["services"]["scheduler"]) == b"S:ping"
            assert await metric(fw, "jobtunnel_forwarder_takeovers_total") == 1


async def read_until_eof(stream: anyio.abc.SocketStream) -> bytes:
    received = b""
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        while True:
            received += await stream.receive()
    return received


async def test_unauthenticated_limit_evicts_oldest_idle(tmp_path: Path) -> None:
    async with forwarder(tmp_path, max_unauthenticated=2, login_timeout=120.0) as fw:
        idle = [await anyio.connect_tcp(fw.ssh.host, fw.ssh.port) for _ in range(2)]
        for stream in idle:  # each is a live SSH connection that never authenticates
            with anyio.fail_after(STEP):
                assert (await stream.receive()).startswith(b"SSH-2.0-")
        await wait_for(lambda: fw.forwarder.unauthenticated == 2, STEP, "two unauthenticated")
        # A newcomer is never refused: the oldest idle connection makes room for it.
        async with expect_refusal(fw, "preauth-evicted", user=None, reason="oldest idle"):
            conn = await probe(fw)
        async with conn:
            assert conn.get_extra_info("username") == "alice"
        with anyio.fail_after(STEP):  # far below login_timeout: dropped at once
            await read_until_eof(idle[0])
        assert fw.forwarder.unauthenticated == 1
        for stream in idle:
            await stream.aclose()
        await wait_for(lambda: fw.forwarder.unauthenticated == 0, STEP, "the slots freed")


async def test_login_timeout_drops_silent_connection(tmp_path: Path) -> None:
    async with forwarder(tmp_path, login_timeout=1.0) as fw:
        started = anyio.current_time()
        stream = await anyio.connect_tcp(fw.ssh.host, fw.ssh.port)
        await wait_for(lambda: fw.forwarder.unauthenticated == 1, STEP, "one unauthenticated")
        with anyio.fail_after(STEP):
            banner = await read_until_eof(stream)
        assert banner.startswith(b"SSH-2.0-jobtunnel")
        assert anyio.current_time() - started >= 0.9  # not before login_timeout (1 s)
        await stream.aclose()
        await wait_for(lambda: fw.forwarder.unauthenticated == 0, STEP, "the slot freed")
        assert len(fw.forwarder.registry) == 0


@pytest.mark.parametrize("stage", ["no-channel", "no-hello", "no-ready"])
async def test_no_ready_within_login_timeout(tmp_path: Path, stage: str) -> None:
    async with forwarder(tmp_path, login_timeout=2.0) as fw:
        before = await metric(
            fw, "jobtunnel_forwarder_sessions_ended_total", reason="ready-timeout"
        )
        with capture_logs() as logs:
            conn = await probe(fw)
            async with conn:
                if stage != "no-channel":
                    control = await RawControl.open(conn)
                    if stage == "no-ready":
                        control.send(hello("scheduler"))
                        assert isinstance(await control.receive(), p.Welcome)
                await wait_closed(conn, "the connection that never got ready")
            entry = await wait_for(lambda: find(logs, "session ended"), STEP, "session ended")
        assert entry["user"] == "alice"
        assert entry["reason"].startswith("no ready within")
        await wait_for(lambda: len(fw.forwarder.registry) == 0, STEP, "the session forgotten")
        after = await metric(fw, "jobtunnel_forwarder_sessions_ended_total", reason="ready-timeout")
        assert after == before + 1
        assert fw.forwarder.ports.in_use == 0


# --- 5. OpenSSH as a foreign peer ------------------------------------------------------------


def openssh_binaries() -> tuple[str, str]:
    sshpass, ssh = shutil.which("sshpass"), shutil.which("ssh")
    if sshpass is None or ssh is None:
        pytest.skip("OpenSSH client or sshpass not installed (scripts/setup installs them)")
    return sshpass, ssh


def openssh_options(fw: RunningForwarder, tmp_path: Path) -> list[str]:
    known_hosts = tmp_path / "known_hosts"
    public = Path(f"{fw.host_key_path}.pub").read_text().split()
    known_hosts.write_text(f"[{fw.ssh.host}]:{fw.ssh.port} {public[0]} {public[1]}\n")
    return [
        "-F",
        "/dev/null",
        "-p",
        str(fw.ssh.port),
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "ConnectTimeout=20",
    ]


def openssh_env(tmp_path: Path, token: str | None = None) -> dict[str, str]:
    env = base_env()
    env["HOME"] = str(tmp_path)
    env.pop("SSH_AUTH_SOCK", None)
    env.pop("DISPLAY", None)
    if token is not None:
        env["SSHPASS"] = token  # the token never goes into argv
    return env


@contextlib.contextmanager
def openssh_forward(
    fw: RunningForwarder,
    tmp_path: Path,
    spec: str,
    name: str,
    auth: str = "password,keyboard-interactive",
) -> Iterator[Any]:
    sshpass, ssh = openssh_binaries()
    argv = [
        sshpass,
        "-e",
        ssh,
        *openssh_options(fw, tmp_path),
        "-o",
        f"PreferredAuthentications={auth}",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "ServerAliveInterval=5",
        "-N",
        "-R",
        spec,
        "alice@127.0.0.1",
    ]
    env = openssh_env(tmp_path, TOKENS["alice"])
    with process(argv, tmp_path / f"{name}.log", env) as proc:
        assert TOKENS["alice"] not in " ".join(argv)
        yield proc


@pytest.mark.parametrize(
    ("requested_port", "auth"),
    [
        pytest.param(0, "password", id="port-0"),
        pytest.param(8786, "password", id="port-8786"),
        pytest.param(0, "keyboard-interactive", id="kbdint"),
    ],
)
async def test_openssh_remote_forward(tmp_path: Path, requested_port: int, auth: str) -> None:
    """``ssh -N -R scheduler:<port>:...``: the forwarder picks the port, channels still match."""
    async with echo_server(b"O:") as port, forwarder(tmp_path) as fw:
        spec = f"scheduler:{requested_port}:127.0.0.1:{port}"
        with openssh_forward(fw, tmp_path, spec, f"ssh-{requested_port}", auth) as ssh:

            def published() -> object:
                assert ssh.proc.poll() is None, ssh.log()
                return fw.tunnels()

            await wait_for(published, STEP, "the OpenSSH session published")
            (tunnel,) = await tunnels(fw)
            assert tunnel["mode"] == "ssh"
            assert tunnel["user"] == "alice"
            address = tunnel["services"]["scheduler"]
            listen_port = int(address.rpartition(":")[2])
            ports = fw.forwarder.settings.port_range
            assert ports.low <= listen_port <= ports.high  # the forwarder's choice, always
            if requested_port == 0:  # what OpenSSH was told is the real port
                assert f"Allocated port {listen_port} " in ssh.log(), ssh.log()
            for payload in (b"ping", b"pong"):  # two connections, each its own channel
                assert await echo_roundtrip(address, payload) == b"O:" + payload
            ssh.signal(signal.SIGTERM)
            await wait_for(lambda: ssh.proc.poll() is not None, STEP, "ssh to exit")
            await wait_for(lambda: fw.tunnels() == [], STEP, "the tunnel to leave /tunnels")
            assert await tunnels(fw) == []


async def test_openssh_unknown_service_refused(tmp_path: Path) -> None:
    async with echo_server() as port, forwarder(tmp_path) as fw:
        spec = f"postgres:0:127.0.0.1:{port}"
        async with expect_refusal(fw, "service", reason="'postgres' is not allowed"):
            with openssh_forward(fw, tmp_path, spec, "ssh-postgres") as ssh:
                await wait_for(lambda: ssh.proc.poll() is not None, STEP, "ssh to give up")
                assert ssh.proc.returncode != 0, ssh.log()
                assert "remote port forwarding failed" in ssh.log().lower(), ssh.log()
        await wait_for(lambda: len(fw.forwarder.registry) == 0, STEP, "the session forgotten")
        assert fw.tunnels() == []


async def test_openssh_agent_and_x11_forwarding_refused(tmp_path: Path) -> None:
    """``ssh -A -X`` asking for a shell: three refusals, each counted and logged."""
    sshpass, ssh = openssh_binaries()
    agent_sock = tmp_path / "agent.sock"
    # OpenSSH only asks for agent forwarding if SSH_AUTH_SOCK accepts connections.
    agent = await anyio.create_unix_listener(agent_sock)

    async def silent_agent(stream: anyio.abc.SocketStream) -> None:
        await stream.aclose()

    async with anyio.create_task_group() as tg, forwarder(tmp_path) as fw:
        tg.start_soon(agent.serve, silent_agent)
        kinds = ("agent-forwarding", "x11", "shell")
        before = {kind: await refusals(fw, kind) for kind in kinds}
        env = openssh_env(tmp_path, TOKENS["alice"])
        env["SSH_AUTH_SOCK"] = str(agent_sock)
        env["DISPLAY"] = "127.0.0.1:0"
        argv = [sshpass, "-e", ssh, *openssh_options(fw, tmp_path), "-A", "-X", "-T"]
        argv += ["-o", "PreferredAuthentications=password", "alice@127.0.0.1"]
        with capture_logs() as logs, process(argv, tmp_path / "ssh-ax.log", env) as proc:
            await wait_for(lambda: proc.proc.poll() is not None, STEP, "ssh to give up")
            assert proc.proc.returncode != 0, proc.log()
            assert "X11 forwarding request failed" in proc.log()
            assert "shell request failed" in proc.log()
            for kind in kinds:

                def logged(kind: str = kind) -> LogEntry | None:
                    return find(logs, "refused", kind=kind)

                entry = await wait_for(logged, STEP, f"a logged {kind!r} refusal")
                assert entry["user"] == "alice"
                assert re.fullmatch(PEER_RE, entry["peer"])
                assert entry["reason"]
        for kind in kinds:
            assert await refusals(fw, kind) == before[kind] + 1, kind
        tg.cancel_scope.cancel()
