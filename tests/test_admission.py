"""Hostile peers against the real forwarder on loopback: every bound has a test and a number.

Each attack of issue 12 is replayed here at a bounded size (loopback only, 127.0.0.0/8
source addresses of our own choosing, every connection closed by the test), and checked
three ways: the attacker is stopped at the bound, another user's session keeps working, and
the log stays small. The pure pieces (admission order, budgets, buckets, summaries, source
groups) are tested without sockets first.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncssh
import pytest
from structlog.testing import capture_logs

from daemons.forwarder.admission import (
    ConnectionBudget,
    ConnectionLimits,
    Exceeded,
    PreAuthAdmission,
    RateLimit,
)
from daemons.forwarder.kube import tunnel_name
from daemons.forwarder.server import has_unread_input
from daemons.forwarder.sessions import Session
from shared import hostkeys
from shared import protocol as p
from shared.auth import FailureLimiter
from shared.sources import source_group
from shared.summary import OVERFLOW, LogSummary
from tests.harness import RunningForwarder, agent_settings, running_agent, wait_for
from tests.test_auth import FakeClock
from tests.test_policy import (
    STEP,
    TOKENS,
    RawControl,
    connect,
    forwarder,
    hello,
    metric,
    probe,
    read_until_eof,
    refusals,
    tunnels,
    wait_closed,
)
from tests.test_tunnel import echo_roundtrip, echo_server

pytestmark = pytest.mark.anyio

# --- pure pieces ------------------------------------------------------------------------------


class Peer:
    def __init__(self, name: str, progress: int = 0) -> None:
        self.name, self.progress = name, progress

    def preauth_progress(self) -> int:
        return self.progress

    def evict(self, reason: str) -> None:  # pragma: no cover - the caller evicts
        raise AssertionError


def test_preauth_admission_evicts_oldest_idle_never_the_newcomer() -> None:
    adm = PreAuthAdmission(max_total=3, max_per_source=2)
    a, b, c = Peer("a", progress=2), Peer("b"), Peer("c", progress=1)
    assert adm.admit(a, "s1") == []
    assert adm.admit(b, "s2") == []
    assert adm.admit(c, "s3") == []
    # Full: the oldest idle one (b) goes, not the one in authentication (a), not the newcomer.
    d = Peer("d")
    assert adm.admit(d, "s4") == [(b, "total")]
    # Then the least advanced: d (idle) before c (version sent) before a (in auth).
    e = Peer("e", progress=1)
    assert adm.admit(e, "s5") == [(d, "total")]
    f = Peer("f")
    assert adm.admit(f, "s6") == [(c, "total")]
    assert len(adm) == 3
    # Per source: the source's own oldest goes first, the pool is not touched.
    adm2 = PreAuthAdmission(max_total=10, max_per_source=2)
    x1, x2, x3, y = Peer("x1"), Peer("x2"), Peer("x3"), Peer("y")
    adm2.admit(y, "other")
    adm2.admit(x1, "x")
    adm2.admit(x2, "x")
    assert adm2.admit(x3, "x") == [(x1, "source")]
    assert adm2.count("x") == 2
    assert adm2.leave(x2)
    assert not adm2.leave(x1)
    assert adm2.evictions == 1


def test_unread_input_counts_as_having_spoken() -> None:
    """A client accepted in the same loop turn as a flood behind it has its version in the
    kernel, not yet read: admission must see it as past "said nothing"."""
    import socket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not has_unread_input(ours)
        theirs.sendall(b"SSH-2.0-client\r\n")
        assert has_unread_input(ours)
        ours.recv(64)
        assert not has_unread_input(ours)
    assert not has_unread_input(ours)  # closed: fileno -1, never an exception
    assert not has_unread_input(None)


def test_connection_budget_bounds() -> None:
    budget = ConnectionBudget(ConnectionLimits(max_channels=2, max_auth_tries=1, max_refusals=2))
    budget.channel()
    budget.channel()
    with pytest.raises(Exceeded, match="more than 2 channels") as err:
        budget.channel()
    assert err.value.kind == "channel-limit"
    budget.auth_try()
    with pytest.raises(Exceeded) as err:
        budget.auth_try()
    assert err.value.kind == "auth-tries"
    assert not budget.refused()
    assert not budget.refused()
    assert budget.refused()


def test_rate_limit_bucket() -> None:
    clock = FakeClock()
    bucket = RateLimit(10.0, 5, clock)
    assert all(bucket.allow() for _ in range(5))
    assert not bucket.allow()
    clock.advance(0.25)  # 2.5 tokens
    assert bucket.allow(2)
    assert not bucket.allow()


def test_log_summary_one_line_per_key_and_interval() -> None:
    clock = FakeClock()
    summary = LogSummary(interval=10, max_keys=3, clock=clock)
    assert summary.should_log(("1.2.3.4", "env"))
    assert not any(summary.should_log(("1.2.3.4", "env")) for _ in range(999))
    assert summary.should_log(("1.2.3.4", "exec"))  # another reason: its own line
    assert summary.flush() == []  # interval not over
    clock.advance(10)
    assert sorted(summary.flush()) == [(("1.2.3.4", "env"), 999)]
    # A quiet key starts a new interval by itself.
    assert summary.should_log(("1.2.3.4", "exec"))
    # Bounded keys: past max_keys, new keys share one overflow counter.
    for i in range(100):
        summary.should_log((f"10.0.0.{i}", "env"))
    assert len(summary) <= 3 + 1
    clock.advance(10)
    assert (OVERFLOW, 98) in summary.flush()  # 2 keys had room, 98 share the overflow


def test_source_groups() -> None:
    assert source_group("192.0.2.7") == "192.0.2.7"
    assert source_group("2001:db8:1:2:aaaa::1") == source_group("2001:db8:1:2:ffff::9")
    assert source_group("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert source_group("2001:db8:1:3::1") != source_group("2001:db8:1:2::1")
    assert source_group("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_group("fe80::1%eth0") == "fe80::/64"


def test_limiter_never_locks_a_user_out_from_elsewhere() -> None:
    clock = FakeClock()
    lim = FailureLimiter(max_failures=3, window=60, clock=clock)
    for _ in range(10):  # ten wrong tokens for carol from one address
        lim.record_failure("10.0.0.66", "carol")
    assert lim.check_kind("10.0.0.66", "carol") == (
        "user-source",
        "too many failures for this user from 10.0.0.66",
    )
    assert lim.check("10.0.0.1", "carol") is None  # carol elsewhere: fine
    assert lim.check("10.0.0.66", "dave") is None  # dave behind the same NAT: fine
    # The source as a whole, whatever names it tries: 5x the per-user allowance.
    for i in range(15):
        lim.record_failure("2001:db8::1", f"spray{i}")
    assert lim.check_kind("2001:db8::ffff", "x") == (
        "source",
        "too many failures from 2001:db8::/64",
    )


def fake_session(user: str, identity: tuple[str, str]) -> Session:
    return Session(id="s", user=user, peer="x", mode="agent", identity=identity)


def test_tunnel_names_cannot_collide_across_users() -> None:
    # Same slug ("alice"), same attacker-chosen rest: the hash keeps them apart.
    names = {
        tunnel_name(fake_session(u, (u, "pod:1")))
        for u in ("alice", "Alice", "alice.", "a.lice"[0:1] + "lice")
    }
    assert len(names) == 3  # "alice" twice is the same user and identity
    # ":" in a user name cannot shift the boundary between user and identity.
    assert tunnel_name(fake_session("a:pod", ("a:pod", "pod:x"))) != tunnel_name(
        fake_session("a", ("a", "pod:pod:x"))
    )
    name = tunnel_name(fake_session("alice", ("alice", "pod:1")))
    assert len(name.rsplit("-", 1)[1]) == 32  # 128 bits


# --- host key ---------------------------------------------------------------------------------


def test_host_key_race_serves_the_key_on_disk(tmp_path: Path) -> None:
    for trial in range(10):
        path = tmp_path / f"trial{trial}" / "host_key"
        keys: list[asyncssh.SSHKey] = []
        barrier = threading.Barrier(2)

        def start(barrier: threading.Barrier, path: Path, keys: list[asyncssh.SSHKey]) -> None:
            barrier.wait()
            keys.append(hostkeys.load_or_generate(path))

        threads = [threading.Thread(target=start, args=(barrier, path, keys)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(STEP)
        on_disk = hostkeys.fingerprint(asyncssh.read_private_key(str(path)))
        assert [hostkeys.fingerprint(k) for k in keys] == [on_disk, on_disk]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert hostkeys.fingerprint(asyncssh.read_public_key(f"{path}.pub")) == on_disk
        assert sorted(os.listdir(path.parent)) == ["host_key", "host_key.pub"]


def test_host_key_with_loose_mode_refused(tmp_path: Path) -> None:
    path = tmp_path / "host_key"
    hostkeys.load_or_generate(path)
    path.chmod(0o644)
    with pytest.raises(hostkeys.HostKeyError, match=r"mode 0644: .*chmod 600"):
        hostkeys.load_or_generate(path)
    path.chmod(0o600)
    hostkeys.load_or_generate(path)


# --- against the real forwarder ---------------------------------------------------------------


async def scrape_refusals(fw: RunningForwarder) -> float:
    samples = fw.forwarder.metrics.refusals.collect()[0].samples
    return sum(s.value for s in samples if s.name.endswith("_total"))


@contextlib.asynccontextmanager
async def victim(fw: RunningForwarder) -> AsyncIterator[str]:
    """Another user's live session (bob's agent): yields its scheduler address."""
    async with (
        echo_server(b"V:") as port,
        running_agent(
            agent_settings(fw, user="bob", token=TOKENS["bob"], services=(("scheduler", port),))
        ) as agent,
    ):
        await wait_for(lambda: agent.state.published and fw.tunnels(), STEP, "bob published")
        (tunnel,) = [t for t in await tunnels(fw) if t["user"] == "bob"]
        yield tunnel["services"]["scheduler"]
        assert agent.state.connects == 1, "the victim's session was disturbed"


async def idle_flood(
    fw: RunningForwarder, sources: list[str], per_source: int, stop: anyio.Event
) -> list[int]:
    """Idle TCP connections from each source, reopened as soon as they are dropped."""
    opened = [0]

    async def one(source: str) -> None:
        while not stop.is_set():
            try:
                stream = await anyio.connect_tcp(fw.ssh.host, fw.ssh.port, local_host=source)
            except OSError:
                await anyio.sleep(0.01)
                continue
            opened[0] += 1
            async with stream:
                with anyio.move_on_after(STEP):
                    # Idle: never a byte from us; read until the forwarder drops us.
                    await read_until_eof(stream)

    with anyio.move_on_after(4 * STEP):  # stops by itself whatever happens
        async with anyio.create_task_group() as tg:
            for source in sources:
                for _ in range(per_source):
                    tg.start_soon(one, source)
            await stop.wait()
            tg.cancel_scope.cancel()
    return opened


async def test_idle_preauth_flood_does_not_lock_out_real_clients(tmp_path: Path) -> None:
    """300 idle connections from 30 addresses against 100 slots; alice still gets in in 5 s."""
    sources = [f"127.0.1.{i}" for i in range(1, 31)]
    async with forwarder(tmp_path, login_timeout=60.0, log_summary_interval=10.0) as fw:
        async with victim(fw) as address:
            stop = anyio.Event()
            result: list[list[int]] = []
            with capture_logs() as logs:
                async with anyio.create_task_group() as tg:

                    async def flood() -> None:
                        result.append(await idle_flood(fw, sources, 10, stop))

                    tg.start_soon(flood)
                    await wait_for(
                        lambda: fw.forwarder.preauth.evictions >= 300, 2 * STEP, "the flood"
                    )
                    times = []
                    for _ in range(3):
                        started = anyio.current_time()
                        with anyio.fail_after(5.0):
                            conn = await probe(fw)
                        times.append(anyio.current_time() - started)
                        async with conn:
                            assert conn.get_extra_info("username") == "alice"
                    assert fw.forwarder.unauthenticated <= 100
                    assert await echo_roundtrip(address) == b"V:ping"
                    stop.set()
            evicted = fw.forwarder.preauth.evictions
            assert await refusals(fw, "preauth-evicted") == evicted
            lines = len(logs)
        print(f"\nflood: {result[0][0]} opened, {evicted} evicted, logins {times}, {lines} lines")
        assert evicted >= 300
        # One line per source and kind per interval, not one per connection.
        assert lines < evicted / 2, lines


async def test_one_source_holds_at_most_its_share(tmp_path: Path) -> None:
    async with forwarder(tmp_path, max_unauthenticated_per_source=5, login_timeout=60.0) as fw:
        streams = []
        for _ in range(8):
            streams.append(
                await anyio.connect_tcp(fw.ssh.host, fw.ssh.port, local_host="127.0.2.1")
            )
        await wait_for(lambda: fw.forwarder.preauth.evictions == 3, STEP, "three evicted")
        assert fw.forwarder.preauth.count("127.0.2.1") == 5
        for s in streams:
            await s.aclose()
        await wait_for(lambda: fw.forwarder.unauthenticated == 0, STEP, "all gone")


async def test_auth_tries_per_connection(tmp_path: Path) -> None:
    """MaxAuthTries: the 7th password on one connection ends it."""
    tries: list[str] = []

    class Guesser(asyncssh.SSHClient):
        def password_auth_requested(self) -> str | None:
            tries.append("x")
            return f"guess-{len(tries):04d}-0123456789" if len(tries) < 50 else None

    async with forwarder(tmp_path, auth_max_failures=100) as fw:
        before = await refusals(fw, "auth-tries")
        with pytest.raises((asyncssh.PermissionDenied, asyncssh.DisconnectError)):
            await asyncssh.create_connection(
                Guesser,
                fw.ssh.host,
                fw.ssh.port,
                username="alice",
                known_hosts=None,
                client_keys=None,
                agent_path=None,
                config=[],
                preferred_auth="password",
            )
        assert len(tries) == 7, tries
        assert await refusals(fw, "auth-tries") == before + 1


async def test_wrong_tokens_for_carol_do_not_lock_carol_out(tmp_path: Path) -> None:
    async with forwarder(tmp_path, auth_max_failures=3) as fw:
        settings = fw.forwarder.settings
        fw.forwarder.authenticator.limiter = FailureLimiter(
            max_failures=settings.auth_max_failures, window=settings.auth_failure_window
        )
        for _ in range(10):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, "alice", password="wrong-0123456789", local_addr=("127.0.3.1", 0))
        # From the attacker's address: limited. From alice's own: she gets in.
        assert fw.forwarder.authenticator.limiter.check("127.0.3.1", "alice") is not None
        conn = await connect(fw, "alice", local_addr=("127.0.0.1", 0))
        async with conn:
            assert conn.get_extra_info("username") == "alice"
        assert await metric(fw, "jobtunnel_auth_rate_limited_total", key="user-source") == 7


async def test_token_typed_as_user_name_is_not_logged(tmp_path: Path) -> None:
    token = TOKENS["alice"]
    async with forwarder(tmp_path) as fw:
        with capture_logs() as logs:
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, token, password=token)
            await wait_for(lambda: any(e["event"] == "auth" for e in logs), STEP, "auth line")
        assert token not in repr(logs)
        (line,) = [e for e in logs if e["event"] == "auth"]
        assert line["user"].startswith("unknown:")
        # A known user's name is still logged as is.
        with capture_logs() as logs:
            with pytest.raises(asyncssh.PermissionDenied):
                await connect(fw, "bob", password="wrong-0123456789")
            await wait_for(lambda: any(e["event"] == "auth" for e in logs), STEP, "auth line")
        assert [e["user"] for e in logs if e["event"] == "auth"] == ["bob"]


async def test_invented_services_up_names(tmp_path: Path) -> None:
    """3,800 names in one heartbeat: a protocol error; unannounced ones: ignored, counted."""
    async with forwarder(tmp_path) as fw, victim(fw) as address:
        # Many invented names: over the schema's bound, the frame is refused.
        conn = await probe(fw)
        async with conn:
            control = await RawControl.open(conn)
            control.send(hello("scheduler", instance_id="flood"))
            assert isinstance(await control.receive(), p.Welcome)
            names = {f"s{i}": True for i in range(3800)}
            payload = (
                b'{"type":"heartbeat","seq":1,"sent_at":1.0,"counters":{"services_up":'
                + str(names).replace("'", '"').replace("True", "true").encode()
                + b"}}"
            )
            control.send_raw(len(payload).to_bytes(4, "big") + payload)
            messages = await control.read_to_end()
            errors = [m for m in messages if isinstance(m, p.Error)]
            assert [e.code for e in errors] == ["bad-field"], messages
            assert "over 8" in errors[0].message
        # A few unannounced names (under the bound): ignored, never a metric label.
        conn = await probe(fw)
        async with conn:
            control = await RawControl.open(conn)
            control.send(hello("scheduler", instance_id="few"))
            assert isinstance(await control.receive(), p.Welcome)
            before = await refusals(fw, "service")
            up = {"scheduler": True, "x1": True, "x2": False}
            control.send(p.Heartbeat(seq=1, sent_at=1.0, counters=p.AgentCounters(services_up=up)))
            assert isinstance(await control.receive(), p.HeartbeatAck)
            assert await refusals(fw, "service") == before + 1
            samples = fw.forwarder.metrics.agent_service_up.collect()[0].samples
            assert {s.labels["service"] for s in samples} <= {"scheduler"}, samples
        assert await echo_roundtrip(address) == b"V:ping"


async def test_pending_takeover_hellos_bounded_and_hold_no_ports(tmp_path: Path) -> None:
    """A published identity claimed by many pending hellos: one may wait, the rest refused.

    The one that waits is waiting on the liveness challenge of the holder (which never
    answers, so it gets its welcome at the bound); nothing is reserved meanwhile."""
    async with (
        echo_server(b"S:") as port,
        # No heartbeat deadline during the test: only the challenge may find the owner dead.
        forwarder(tmp_path, max_sessions_per_user=1, heartbeat_interval=30.0) as fw,
        victim(fw) as address,
    ):
        owner = await probe(fw)
        async with owner, contextlib.AsyncExitStack() as stack:
            control = await RawControl.open(owner)
            control.send(hello("scheduler", instance_id="same"))
            assert isinstance(await control.receive(), p.Welcome)
            await owner.forward_remote_port("scheduler", 0, "127.0.0.1", port)
            control.send(p.Ready(services=("scheduler",)))
            await wait_for(lambda: len(fw.tunnels()) == 2, STEP, "alice published")
            in_use = fw.forwarder.ports.in_use
            (owner_session,) = [
                s for s in fw.forwarder.registry if s.published and s.user == "alice"
            ]
            claims = []
            for _ in range(20):
                conn = await stack.enter_async_context(await probe(fw))
                claim = await RawControl.open(conn)
                claim.send(hello("scheduler", "dashboard", instance_id="same"))
                claims.append(claim)
                if len(claims) == 1:
                    await wait_for(lambda: owner_session.challenge, STEP, "the owner challenged")
            # Limit 1, alice at it: one pending takeover may wait, the other 19 are refused
            # while the first one's challenge is still pending.
            outcomes = [type(await claim.receive()).__name__ for claim in claims[1:]]
            assert set(outcomes) == {"Error"}, outcomes
            assert owner_session.challenge is not None
            assert not owner_session.challenge.settled.is_set()
            # A pending hello reserves nothing: ports only at forward time.
            assert fw.forwarder.ports.in_use == in_use
            assert isinstance(await claims[0].receive(), p.Welcome)  # the owner never answered
            assert fw.forwarder.ports.in_use == in_use
            assert await refusals(fw, "session-limit") == 19
            assert len([s for s in fw.forwarder.registry if s.user == "alice"]) <= 2
        assert await echo_roundtrip(address) == b"V:ping"


async def test_channels_and_forward_requests_per_connection(tmp_path: Path) -> None:
    async with forwarder(tmp_path, log_summary_interval=10.0) as fw, victim(fw) as address:
        conn = await probe(fw)
        with capture_logs() as logs:
            async with conn:
                # Each channel opens, then its shell request is refused; the 5th never opens.
                for _ in range(4):
                    with pytest.raises(asyncssh.ChannelOpenError, match="request failed"):
                        await conn.create_session(asyncssh.SSHClientSession)
                with pytest.raises(asyncssh.ChannelOpenError) as err:
                    await conn.create_session(asyncssh.SSHClientSession)
                assert "request failed" not in str(err.value)
                assert await refusals(fw, "channel-limit") == 1
                # Bad forward requests: refused, then the connection is cut.
                before = await scrape_refusals(fw)
                with contextlib.suppress(asyncssh.Error, OSError):
                    for i in range(20_000):
                        if conn.is_closed():
                            break
                        with pytest.raises(asyncssh.ChannelListenError):
                            await conn.forward_remote_port(f"bad{i % 50}", 0, "127.0.0.1", 1)
                await wait_closed(conn, "the abuser")
        refused = await scrape_refusals(fw) - before
        # 16 forward requests looked at, the rest refused unread, cut at 32 refusals in all.
        assert refused <= 33, refused
        assert await refusals(fw, "forward-limit") >= 1
        assert await refusals(fw, "refusal-limit") == 1
        lines = [e for e in logs if e["event"] == "refused"]
        assert len(lines) <= 6, lines
        assert await echo_roundtrip(address) == b"V:ping"


async def test_control_frame_rate(tmp_path: Path) -> None:
    async with forwarder(tmp_path, control_frame_rate=20.0, control_frame_burst=40) as fw:
        conn = await probe(fw)
        async with conn:
            control = await RawControl.open(conn)
            control.send(hello("scheduler"))
            assert isinstance(await control.receive(), p.Welcome)
            beat = p.encode(p.Heartbeat(seq=1, sent_at=1.0))
            control.send_raw(beat * 200)
            messages = await control.read_to_end()
        errors = [m for m in messages if isinstance(m, p.Error)]
        assert [e.code for e in errors] == ["rate-limited"]
        acks = [m for m in messages if isinstance(m, p.HeartbeatAck)]
        assert len(acks) <= 41  # the burst (and what trickled in meanwhile), not 200


async def test_agent_backs_off_from_the_first_auth_failure(tmp_path: Path) -> None:
    """A wrong token: the agent waits before its second try, and longer each time."""
    from daemons.agent.session import AgentIdentity, AgentSession

    async with forwarder(tmp_path) as fw:
        settings = agent_settings(
            fw, token="wrong-token-0123456789", services=(), backoff_initial=1.0, backoff_max=8.0
        )
        session = AgentSession(settings, AgentIdentity(instance_id="b"), settings.read_token())
        with capture_logs() as logs:
            with anyio.move_on_after(6.0):  # a bounded observation window, not a sync point
                await session.run([])
        delays = [e["in_seconds"] for e in logs if e["event"] == "reconnecting"]
        rejected = await metric(
            fw, "jobtunnel_auth_attempts_total", outcome="reject", reason="bad_token"
        )
    assert delays, logs
    # From the very first failure: never an immediate retry; then exponential (with jitter).
    for k, delay in enumerate(delays, start=1):
        assert 0.5 <= delay <= min(8.0, 2 ** (k - 1)), delays
    assert len(delays) <= rejected <= len(delays) + 1, (rejected, delays)
    print(f"\nagent with a wrong token: {rejected:.0f} attempts in 6 s, delays {delays}")
