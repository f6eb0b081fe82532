"""The forwarder's SSH policy: who may log in, and the little they may do.

asyncssh calls the methods of :class:`_Connection` from its own callbacks. They
only decide and hand work over: everything that takes time (hello handling,
publication, heartbeat deadlines, token re-validation) runs in one task per
connection, owned by the forwarder's task group, fed through a bounded inbox.

Everything not explicitly granted is refused, logged with user, peer and
reason, and counted: shell, exec, pty, env, X11 and agent forwarding,
``direct-tcpip`` (a job must never reach into the cluster), unknown subsystems
and services.
"""

from __future__ import annotations

import array
import fcntl
import functools
import math
import secrets
import termios
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import anyio
import asyncssh
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from daemons.forwarder.admission import (
    ConnectionBudget,
    ConnectionLimits,
    Exceeded,
    PreAuthAdmission,
    RateLimit,
    source_group,
)
from daemons.forwarder.metrics import ForwarderMetrics
from daemons.forwarder.ports import PortAllocator, PortsExhausted
from daemons.forwarder.sessions import (
    Forward,
    LivenessChallenge,
    Publisher,
    Session,
    SessionLimit,
    SessionRegistry,
    identity_of,
)
from daemons.forwarder.settings import ForwarderSettings
from shared import hostkeys
from shared import protocol as p
from shared.auth import Authenticator
from shared.config import HostPort, Secret
from shared.daemon import ListenError
from shared.logs import get_logger
from shared.sources import AllowList
from shared.summary import LogSummary

log = get_logger("jobtunnel.forwarder")

SUBSYSTEM = "jobtunnel"
INBOX_SIZE = 64
BIND_ATTEMPTS = 8
# After a fatal error frame, how long the agent gets to read it and hang up itself:
# disconnecting at once aborts TCP, and a reset can throw the frame away.
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class _ForwardReady:
    """Internal event: a plain SSH client's forward is set up."""

    service: str


@dataclass(frozen=True, slots=True)
class _ChannelClosed:
    reason: str


_Event = p.Message | _ForwardReady | _ChannelClosed


class Forwarder:
    """Owns the SSH listener, the sessions and the per-connection tasks."""

    def __init__(
        self,
        settings: ForwarderSettings,
        *,
        host_key: asyncssh.SSHKey,
        authenticator: Authenticator,
        publisher: Publisher,
        metrics: ForwarderMetrics,
    ) -> None:
        self.settings = settings
        self.host_key = host_key
        self.authenticator = authenticator
        self.publisher = publisher
        self.metrics = metrics
        self.registry = SessionRegistry(max_per_user=settings.max_sessions_per_user)
        self.ports = PortAllocator(settings.port_range)
        self.preauth = PreAuthAdmission(
            max_total=settings.max_unauthenticated,
            max_per_source=settings.max_unauthenticated_per_source,
        )
        self.limits = ConnectionLimits(
            max_channels=settings.max_channels_per_connection,
            max_forward_requests=settings.max_forward_requests_per_connection,
            max_auth_tries=settings.max_auth_tries,
            max_refusals=settings.max_refusals_per_connection,
        )
        self.log_summary = LogSummary(interval=settings.log_summary_interval)
        authenticator.log_summary = self.log_summary
        self.allowed_sources = AllowList.parse(settings.source_allow_list)
        self.draining = False
        self._tg: TaskGroup | None = None
        self._server: asyncssh.SSHAcceptor | None = None
        self._connections: set[_Connection] = set()
        self._connections_changed = anyio.Event()

    @property
    def unauthenticated(self) -> int:
        return len(self.preauth)

    @property
    def advertise_host(self) -> str:
        return self.settings.advertise_host or self.settings.service_host

    def tunnels(self) -> list[dict[str, object]]:
        return [s.describe(self.advertise_host) for s in self.registry.published()]

    def ready_check(self) -> str | None:
        if self._server is None:
            return "ssh listener not started"
        if self.draining:
            return "draining"
        if (reason := self.publisher.ready_check()) is not None:
            return reason
        if not self.authenticator.available:
            return "token authority unavailable"
        return None

    async def run(self, *, task_status: TaskStatus[HostPort] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound SSH address once listening."""
        s = self.settings
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.publisher.run, self.end_session)
            tg.start_soon(self._summarise_logs)
            self._server = await _listen(
                lambda: _Connection(self),
                s.listen.host,
                s.listen.port,
                server_host_keys=[self.host_key],
                server_version="jobtunnel",
                login_timeout=s.login_timeout,
                keepalive_interval=s.keepalive_interval,
                keepalive_count_max=s.keepalive_count_max,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
                allow_scp=False,
                encoding=None,
                line_editor=False,
                reuse_address=True,
                encryption_algs=list(hostkeys.CIPHERS),
            )
            port = self._server.sockets[0].getsockname()[1]
            log.info("listening", ssh=str(HostPort(s.listen.host, port)))
            task_status.started(HostPort(s.listen.host, port))
            try:
                await anyio.sleep_forever()
            finally:
                self._server.close()
                for conn in list(self._connections):
                    conn.close("forwarder stopping")
                tg.cancel_scope.cancel()

    async def drain(self) -> None:
        """Stop accepting, ask every agent to reconnect elsewhere, wait a bounded time."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.send_drain("forwarder shutting down")
        with anyio.move_on_after(self.settings.drain_timeout):
            while self._connections:
                self._connections_changed = anyio.Event()
                await self._connections_changed.wait()
        for conn in list(self._connections):
            conn.close("forwarder shutting down")
        log.info("drained", remaining=len(self._connections))

    def end_session(self, session_id: str, reason: str, code: str = "session-ended") -> None:
        """End a live session (e.g. its Tunnel was deleted); unknown ids are ignored."""
        for session in self.registry:
            if session.id == session_id:
                session.close(reason, code)

    # Called by connections.

    def start_connection_task(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    def refuse(self, kind: str, reason: str, *, user: str | None, peer: str, **extra: Any) -> None:
        self.metrics.refusals.labels(kind=kind).inc()
        if self.log_summary.should_log((source_group(peer.rsplit(":", 1)[0]), kind)):
            log.warning("refused", kind=kind, reason=reason, user=user, peer=peer, **extra)

    def admit_source(self, session: Session, service: str, host: str, port: int) -> bool:
        """Every in-cluster connection to a tunnelled service, before a byte is forwarded."""
        if self.allowed_sources.admits(host):
            return True
        verdict = self.publisher.admits_source(session, host)
        if verdict:
            return True
        # Before the cluster's list arrives (well under a second after publication) a refusal
        # says nothing about the peer: counted and logged, not reported to the owner.
        kind = "source" if verdict is False else "source-pending"
        self.metrics.refusals.labels(kind=kind).inc()
        if verdict is False:
            session.refuse_source(host, self.settings.max_refused_sources)
            # Counts and times too: a new peer is patched at once, the rest with the next beat.
            self.publisher.refusals_changed(session)
        if self.log_summary.should_log((source_group(host), kind)):
            reason = (
                f"{host} is not allowed to reach {session.user}'s {service}"
                if verdict is False
                else f"{host} may not reach {session.user}'s {service} yet: the cluster's "
                "allow-list for this tunnel has not arrived"
            )
            log.warning(
                "refused",
                kind=kind,
                reason=reason,
                user=session.user,
                session=session.id,
                service=service,
                peer=f"{host}:{port}",
            )
        return False

    def note(self, kind: str, peer_host: str, event: str, **fields: Any) -> None:
        """An info line that a flood would repeat (e.g. pre-auth closes): summarised too."""
        if self.log_summary.should_log((source_group(peer_host), kind)):
            log.info(event, **fields)

    async def _summarise_logs(self) -> None:
        interval = self.settings.log_summary_interval
        while True:
            await anyio.sleep(interval)
            for (source, kind), count in self.log_summary.flush():
                log.warning("repeated", kind=kind, source=source, count=count, seconds=interval)


class _PolicyChannel(asyncssh.SSHServerChannel):  # type: ignore[type-arg]
    """asyncssh accepts ``env`` silently and refuses pty/X11/agent without telling us.

    These overrides (asyncssh dispatches channel requests to ``_process_<type>_request``)
    make each of them an explicit, logged and counted refusal.
    """

    _policy_refuse: Callable[[str, str], None]

    def _process_env_request(self, packet: Any) -> bool:
        key = packet.get_string()
        packet.get_string()  # the value is not ours to log
        packet.check_end()
        name = key[:64].decode("utf-8", "replace")
        self._policy_refuse("env", f"environment variables are not accepted ({name!r})")
        return False

    def _process_pty_req_request(self, packet: Any) -> bool:
        self._policy_refuse("pty", "no terminals here")
        return False

    def _process_x11_req_request(self, packet: Any) -> bool:
        self._policy_refuse("x11", "X11 forwarding is not offered")
        return False

    def _process_auth_agent_req_at_openssh_dot_com_request(  # type: ignore[override]
        self, packet: Any
    ) -> bool:
        packet.check_end()
        self._policy_refuse("agent-forwarding", "agent forwarding is not offered")
        return False


class _ControlSession(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """One SSH session channel: the jobtunnel subsystem, nothing else."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.is_control = False

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def shell_requested(self) -> bool:
        self._conn.refuse("shell", "no shell here")
        return False

    def exec_requested(self, command: str) -> bool:
        self._conn.refuse("exec", "no commands here", command=command[:200])
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem != SUBSYSTEM:
            self._conn.refuse("subsystem", f"unknown subsystem {subsystem[:64]!r}")
            return False
        if not self._conn.attach_control(self):
            return False
        self.is_control = True
        return True

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._conn.control_data(data)

    def eof_received(self) -> bool:
        if self.is_control:
            self._conn.deliver(_ChannelClosed("control channel closed by agent"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_control:
            self._conn.deliver(_ChannelClosed("control channel lost"))

    def write(self, data: bytes) -> None:
        if self._chan is not None and not self._chan.is_closing():
            self._chan.write(data)

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()


def has_unread_input(sock: Any) -> bool:
    """Whether the kernel holds bytes from the peer that the event loop has not read yet."""
    if sock is None:
        return False
    pending = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, pending, True)
    except (OSError, ValueError):
        return False
    return pending[0] > 0


class _Connection(asyncssh.SSHServer):
    """One SSH connection: authentication, policy decisions, and its session task."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.fw = forwarder
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.peer_host = "?"
        self.user: str | None = None
        self.authenticated = False
        self.token: Secret | None = None
        self.session: Session | None = None
        self.control: _ControlSession | None = None
        self.conversation = p.Conversation(p.Role.FORWARDER)
        self.reserved: dict[str, int] = {}
        self.busy: list[int] = []
        self.closed = False
        send, receive = anyio.create_memory_object_stream[_Event](INBOX_SIZE)
        self._inbox_send: MemoryObjectSendStream[_Event] = send
        self._inbox: MemoryObjectReceiveStream[_Event] = receive
        self._counted_unauth = False
        self._asked_auth = False
        self.source = "?"
        self.budget = ConnectionBudget(forwarder.limits)
        self.frames = RateLimit(
            forwarder.settings.control_frame_rate,
            forwarder.settings.control_frame_burst,
            time.monotonic,
        )
        self.announced: set[str] = set()
        self.end_reason: str | None = None
        # The holder this session's liveness challenge found dead: it may replace that one.
        self._shown_dead: Session | None = None
        self._linger = False
        self._lost = anyio.Event()

    # asyncssh callbacks: connection and authentication

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peername = conn.get_extra_info("peername") or ("?", 0)
        self.peer_host = str(peername[0])
        self.peer = f"{peername[0]}:{peername[1]}"
        if self.fw.draining:
            self.refuse("draining", "forwarder is shutting down")
            conn.close()
            return
        self.source = source_group(self.peer_host)
        # Never refuse a newcomer for want of room: evict the oldest idle one instead.
        for victim, scope in self.fw.preauth.admit(self, self.source):
            victim.evict(f"pre-auth {scope} limit: oldest idle connection evicted")
        self._counted_unauth = True
        self.fw.metrics.unauthenticated.set(self.fw.unauthenticated)
        self.fw._connections.add(self)

    def evict(self, reason: str) -> None:
        """Admission chose this unauthenticated connection to make room for a newer one."""
        self._counted_unauth = False
        self.fw.metrics.unauthenticated.set(self.fw.unauthenticated)
        self.refuse("preauth-evicted", reason)
        if self.conn is not None:
            self.conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.authenticated and self.conn is not None:
            # Login timeout, failed logins, or a scanner: nothing published, but not silent.
            self.fw.metrics.unauthenticated_closed.inc()
            self.fw.note(
                "closed-before-auth",
                self.peer_host,
                "closed before authentication",
                peer=self.peer,
                user=self._loggable_user(),
                error=str(exc)[:200] if exc else None,
            )
        self._leave_unauthenticated()
        self.closed = True
        self._lost.set()
        self.fw._connections.discard(self)
        self.fw._connections_changed.set()
        self._inbox_send.close()
        if self.session is None:
            for port in self.reserved.values():
                self.fw.ports.release(port)
            self.reserved.clear()

    def begin_auth(self, username: str) -> bool:
        self.user = username
        self._asked_auth = True
        return True

    def preauth_progress(self) -> int:
        if self._asked_auth:
            return 2
        if self.conn is None:
            return 0
        if self.conn.get_extra_info("client_version"):
            return 1
        # Accepted in the same loop turn as a burst behind it, a real client's version is in
        # the kernel buffer but not yet read: it has spoken, the idle flood has not.
        return 1 if has_unread_input(self.conn.get_extra_info("socket")) else 0

    def _loggable_user(self) -> str | None:
        """Before authentication the user name is a claim, maybe a pasted token."""
        if self.user is None or self.authenticated:
            return self.user
        return self.fw.authenticator.loggable_user(self.user)

    def public_key_auth_supported(self) -> bool:
        return False

    def password_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
        # "Password" in the prompt: clients answering keyboard-interactive from a
        # configured password (asyncssh's password=, sshpass) look for that word.
        return ("", "", "", [("Password (JupyterHub token): ", False)])

    async def validate_kbdint_response(self, username: str, responses: Any) -> bool:
        return len(responses) == 1 and await self.validate_password(username, responses[0])

    async def validate_password(self, username: str, password: str) -> bool:
        try:
            self.budget.auth_try()
        except Exceeded as exc:  # MaxAuthTries: a guesser must reconnect (and be admitted)
            self.refuse(exc.kind, str(exc))
            if self.conn is not None:
                self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, str(exc))
            return False
        decision = await self.fw.authenticator.login(username, password, self.peer_host)
        if decision.ok:
            self.token = Secret(password)
        elif decision.for_the_client and self.conn is not None:
            self.conn.send_auth_banner(decision.reason + "\r\n")
        return decision.ok

    def auth_completed(self) -> None:
        self._leave_unauthenticated()
        self.authenticated = True
        assert self.user is not None
        self.session = Session(
            id=secrets.token_hex(6),
            user=self.user,
            peer=self.peer,
            mode="ssh",
            close=self.fail,
            probe=self._probe,
        )
        self.fw.registry.add(self.session)
        self.fw.metrics.sessions_started.inc()
        log.info("authenticated", user=self.user, peer=self.peer, session=self.session.id)
        self.fw.start_connection_task(self._run)

    def _leave_unauthenticated(self) -> None:
        if self._counted_unauth:
            self._counted_unauth = False
            self.fw.preauth.leave(self)
            self.fw.metrics.unauthenticated.set(self.fw.unauthenticated)

    # asyncssh callbacks: what the authenticated client asks for

    def session_requested(self) -> Any:
        assert self.conn is not None
        try:
            self.budget.channel()
        except Exceeded as exc:
            self.refuse(exc.kind, str(exc))
            return False
        chan = self.conn.create_server_channel(encoding=None)
        chan.__class__ = _PolicyChannel
        cast(_PolicyChannel, chan)._policy_refuse = lambda kind, reason: self.refuse(kind, reason)
        return chan, _ControlSession(self)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        self.refuse(
            "direct-tcpip",
            "connections into the cluster are not offered",
            dest=f"{dest_host[:64]}:{dest_port}",
        )
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self.refuse("direct-streamlocal", "unix socket forwarding is not offered")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self.refuse("streamlocal-forward", "unix socket forwarding is not offered")
        return False

    def tun_requested(self, unit: int | None) -> bool:
        self.refuse("tun", "tunnel devices are not offered")
        return False

    def tap_requested(self, unit: int | None) -> bool:
        self.refuse("tap", "tunnel devices are not offered")
        return False

    async def server_requested(self, listen_host: str, listen_port: int) -> Any:
        session = self.session
        service = listen_host
        if session is None or self.closed:
            return False
        try:
            self.budget.forward_request()
        except Exceeded as exc:
            self.refuse(exc.kind, str(exc))
            return False
        if service not in self.fw.settings.allowed_services:
            self.refuse("service", f"service {service[:64]!r} is not allowed", service=service[:64])
            return False
        if service in session.forwards:
            self.refuse("service", f"service {service!r} is already forwarded")
            return False
        if self.control is not None:
            if service not in self.announced:
                self.refuse("service", f"service {service!r} was not announced in hello")
                return False
        else:
            try:
                self.fw.registry.check_limit(session)
            except SessionLimit as exc:
                self.refuse("session-limit", str(exc))
                return False
        listener = await self._bind(service, listen_port)
        if listener is None:
            return False
        if self.control is None:
            self.deliver(_ForwardReady(service))
        return listener

    async def _bind(self, service: str, requested_port: int) -> Any:
        """Listen for ``service`` on a port of the range; a port taken by others is skipped."""
        assert self.conn is not None
        assert self.session is not None
        host = self.fw.settings.service_host
        for _ in range(BIND_ATTEMPTS):
            port = self.reserved.get(service)
            if port is None:
                try:
                    port = self.fw.ports.reserve()
                except PortsExhausted as exc:
                    self.refuse("ports-exhausted", str(exc))
                    return None
                self.reserved[service] = port
            try:
                # The channel names the service and the port the client asked
                # for: that is the key under which the client registered it.
                listener = await self.conn.forward_local_port(
                    host,
                    port,
                    service,
                    requested_port or port,
                    accept_handler=functools.partial(self.fw.admit_source, self.session, service),
                )
            except OSError as exc:
                log.warning("port busy", port=port, error=str(exc), session=self.session.id)
                # Kept out of the pool for this session's life: someone else holds it.
                self.busy.append(self.reserved.pop(service))
                continue
            self.session.forwards[service] = Forward(service, host, port, requested_port)
            self.fw.metrics.ports_in_use.set(self.fw.ports.in_use)
            return listener
        self.refuse("bind", f"no free port for {service!r} after {BIND_ATTEMPTS} attempts")
        return None

    # Control channel plumbing

    def attach_control(self, control: _ControlSession) -> bool:
        if self.control is not None:
            self.refuse("subsystem", "only one control channel per connection")
            return False
        if self.session is not None and self.session.forwards:
            self.refuse("subsystem", "the control channel must come before any forward")
            return False
        self.control = control
        if self.session is not None:
            self.session.mode = "agent"
        return True

    def control_data(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            messages = self.conversation.receive_data(data)
        except p.ProtocolError as exc:
            # A bye (or anything valid) just before the garbage still counts.
            for message in exc.decoded:
                self.deliver(message)
            self.protocol_error(exc)
            return
        if messages and not self.frames.allow(len(messages)):
            rate = self.fw.settings.control_frame_rate
            self.protocol_error(
                p.ProtocolError("rate-limited", f"more than {rate:g} control frames per second")
            )
            return
        if messages:
            self._answered(messages)
        for message in messages:
            self.deliver(message)

    def _probe(self, challenge: LivenessChallenge) -> None:
        """A claimant wants this session's identity: ask the agent to prove it is alive."""
        state = self.conversation.state
        if self.closed or state is p.ConversationState.CLOSED:
            challenge.settle(False)
        elif self.control is None:
            # A plain SSH client can't be asked (asyncssh keepalives watch it), and it has
            # no identity a hello could claim: never reached, but never a takeover either.
            challenge.settle(True)
        elif (self.conversation.version or 0) >= p.PING_VERSION:
            self.send(p.Ping(nonce=challenge.nonce))
        elif self._heartbeat_recent():
            # Version 1 has no ping and beats every heartbeat_interval, longer than the bound:
            # a beat within 1.5 intervals is taken as alive (a live holder is never replaced).
            challenge.settle(True)
        # Otherwise any frame arriving before the deadline settles it.

    def _heartbeat_recent(self) -> bool:
        beat = self.session.last_heartbeat if self.session is not None else None
        window = 1.5 * self.fw.settings.heartbeat_interval
        return beat is not None and time.time() - beat < window

    def _answered(self, messages: list[p.Message]) -> None:
        """Settle a pending liveness challenge with what the agent just sent."""
        challenge = self.session.challenge if self.session is not None else None
        if challenge is None or challenge.settled.is_set():
            return
        if (self.conversation.version or 0) < p.PING_VERSION or any(
            isinstance(m, p.Pong) and m.nonce == challenge.nonce for m in messages
        ):
            challenge.settle(True)

    def deliver(self, event: _Event) -> None:
        try:
            self._inbox_send.send_nowait(event)
        except anyio.WouldBlock:
            self.protocol_error(p.ProtocolError("flooding", "too many messages unanswered"))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def send(self, message: p.Message) -> None:
        # After our fatal error or bye, in-flight heartbeats go unanswered by design.
        if self.control is None or self.conversation.our_closed:
            return
        try:
            self.control.write(self.conversation.send(message))
        except p.ProtocolError:
            log.exception("internal protocol misuse", message=type(message).__name__)

    def send_drain(self, reason: str) -> None:
        if self.control is not None and self.conversation.state is not p.ConversationState.CLOSED:
            self.send(p.Drain(reason=reason, retry_after=0.0))
        elif self.control is None:
            self.close(reason)

    def protocol_error(self, exc: p.ProtocolError) -> None:
        self.fw.metrics.protocol_errors.labels(code=exc.code).inc()
        self.refuse("protocol", str(exc), code=exc.code)
        self.fail(f"protocol error: {exc}", exc.code)

    def refuse(self, kind: str, reason: str, **extra: Any) -> None:
        self.fw.refuse(kind, reason, user=self._loggable_user(), peer=self.peer, **extra)
        if self.budget.refused() and not self.closed:
            limit = self.fw.limits.max_refusals
            self.fw.refuse(
                "refusal-limit",
                f"more than {limit} refused requests on one connection",
                user=self._loggable_user(),
                peer=self.peer,
            )
            self.fail(f"more than {limit} refused requests", "refusal-limit")

    def fail(self, reason: str, code: str = "session-ended") -> None:
        """End the session with an ``error`` frame the agent reads before the line goes."""
        if self.closed:
            return
        if self.control is not None and not self.conversation.our_closed:
            self.send(p.Error(code=code, message=reason[:1000], fatal=True))
            self._linger = self.session is not None  # the session task disconnects later
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None and self.session.challenge is not None:
            self.session.challenge.settle(False)  # a closing holder is no holder
        if self.session is not None:
            log.info("closing", session=self.session.id, user=self.user, reason=reason)
        self.end_reason = reason
        self._inbox_send.close()
        if not self._linger:
            self._disconnect(reason)

    def _disconnect(self, reason: str) -> None:
        if self.conn is not None and not self._lost.is_set():
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason[:200])

    # The session task: everything with a deadline or an await.

    async def _run(self) -> None:
        session = self.session
        assert session is not None
        reason = "connection closed"
        try:
            reason = await self._serve(session)
        except Exception as exc:  # one bad peer must never take the forwarder down
            log.exception("session failed", session=session.id, user=session.user)
            reason = f"internal error: {type(exc).__name__}"
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(session, self.end_reason or reason)

    async def _serve(self, session: Session) -> str:
        settings = self.fw.settings
        deadline = anyio.current_time() + settings.login_timeout
        async with anyio.create_task_group() as tg:
            if self.token is not None:
                tg.start_soon(self._revalidate, session)
            async with self._inbox:
                while True:
                    if session.published and self.control is not None:
                        timeout = 3 * settings.heartbeat_interval
                    elif session.published:
                        timeout = math.inf  # plain SSH: asyncssh keepalives watch it
                    else:
                        timeout = max(0.0, deadline - anyio.current_time())
                    with anyio.move_on_after(timeout) as scope:
                        try:
                            event = await self._inbox.receive()
                        except anyio.EndOfStream:
                            break
                    if scope.cancelled_caught:
                        what = "heartbeat" if session.published else "ready"
                        self.fail(f"no {what} within {timeout:.0f}s", "timeout")
                        break
                    outcome = await self._handle(session, event)
                    if outcome is not None:
                        self.close(outcome)
                        break
            tg.cancel_scope.cancel()
        return "connection closed"

    async def _handle(self, session: Session, event: _Event) -> str | None:
        """Act on one event; returns a reason to end the session, or None."""
        if isinstance(event, _ChannelClosed):
            return event.reason
        if isinstance(event, _ForwardReady):
            if not session.published:
                await self._publish(session)
            else:  # a plain SSH client's later forward: publish the new service too
                await self.fw.publisher.publish(session)
            return None
        if isinstance(event, p.Hello):
            return await self._hello(session, event)
        if isinstance(event, p.Ready):
            missing = sorted(self.announced - set(session.forwards))
            if missing:
                log.warning("ready with missing forwards", session=session.id, missing=missing)
            # Another claimant may have published the identity since our hello's challenge.
            if (refusal := await self._claim(session)) is not None:
                return refusal
            await self._publish(session)
            return None
        if isinstance(event, p.Heartbeat):
            now = time.time()
            session.last_heartbeat = now
            session.counters = event.counters
            reported = event.counters.services_up
            unknown = sorted(set(reported) - self.announced)
            if unknown:
                self.refuse("service", f"heartbeat reports unannounced services {unknown[:4]}")
            session.services_up.update((n, up) for n, up in reported.items() if n in self.announced)
            self.fw.metrics.observe_counters(session)
            if session.published:
                self.fw.publisher.heartbeat(session)
            self.send(p.HeartbeatAck(seq=event.seq, sent_at=event.sent_at, received_at=now))
            return None
        if isinstance(event, p.ServiceStatus):
            if event.name not in self.announced:
                self.refuse("service", f"status of unannounced service {event.name!r}")
                return None
            session.services_up[event.name] = event.up
            log.info("service", session=session.id, service=event.name, up=event.up)
            return None
        if isinstance(event, p.Bye):
            return f"agent said bye: {event.reason}"
        if isinstance(event, p.Error):
            log.warning("agent error", session=session.id, code=event.code, message=event.message)
            return f"agent error: {event.code}" if event.fatal else None
        return None

    async def _hello(self, session: Session, hello: p.Hello) -> str | None:
        try:
            version = p.negotiate(hello.versions)
        except p.ProtocolError as exc:
            self.fail(str(exc), exc.code)
            return str(exc)
        session.identity = identity_of(session.user, hello.pod, hello.job, hello.instance_id)
        session.instance_id = hello.instance_id
        session.agent_version = hello.agent_version
        session.job, session.pod, session.private_ip = hello.job, hello.pod, hello.private_ip
        session.service_ports = {s.name: s.port for s in hello.services}
        try:
            self.fw.registry.check_limit(session)
        except SessionLimit as exc:
            self.refuse("session-limit", str(exc))
            self.fail(str(exc), "session-limit")
            return str(exc)
        # Before anything is announced or reserved: a refused claim holds no ports.
        if (refusal := await self._claim(session)) is not None:
            return refusal
        addresses = []
        for service in hello.services:
            if service.name not in self.fw.settings.allowed_services:
                self.refuse("service", f"service {service.name!r} is not allowed")
                continue
            # No port yet: one is reserved when the forward is requested (a hello alone
            # must hold nothing), and the forward's reply tells the agent which.
            self.announced.add(service.name)
            addresses.append(
                p.ServiceAddress(name=service.name, host=self.fw.advertise_host, port=0)
            )
        self.send(
            p.Welcome(
                version=version,
                session_id=session.id,
                heartbeat_interval=self.fw.settings.heartbeat_interval,
                services=tuple(addresses),
            )
        )
        log.info(
            "hello",
            session=session.id,
            user=session.user,
            identity=":".join(session.identity),
            job=hello.job.global_job_id if hello.job else None,
            pod=f"{hello.pod.namespace}/{hello.pod.name}" if hello.pod else None,
            private_ip=hello.private_ip,
            services=[s.name for s in hello.services],
        )
        return None

    async def _claim(self, session: Session) -> str | None:
        """A live holder keeps its identity; only one shown dead is replaced.

        Returns a reason to end ``session`` (it was refused), or None to go on.
        """
        holder = self.fw.registry.holder(session)
        if session.identity is None:
            return None
        if holder is None:
            refusal = await self._claim_elsewhere(session)
            holder = self.fw.registry.holder(session)
            if refusal is not None or holder is None:
                return refusal
            # Someone published the identity here while we asked the API: challenge it too.
        if holder in (session, self._shown_dead):
            return None
        started = anyio.current_time()
        challenge = holder.challenge_liveness(self.fw.settings.takeover_challenge_timeout)
        alive = await challenge.wait()
        waited = round(anyio.current_time() - started, 3)
        self.fw.metrics.liveness_challenges.labels(outcome="alive" if alive else "dead").inc()
        identity = ":".join(session.identity)
        if self.closed:
            return "claimant closed while its holder was challenged"
        if not alive:
            log.warning(
                "holder failed the liveness challenge: replacing it",
                session=session.id,
                holder=holder.id,
                user=session.user,
                identity=identity,
                peer=self.peer,
                holder_peer=holder.peer,
                waited=waited,
            )
            self._shown_dead = holder
            return None
        reason = (
            f"identity held: {identity} is published by live session {holder.id}, "
            f"which answered a liveness challenge in {waited:.3f}s"
        )
        if holder.refuse_claim(self.peer_host, self.fw.settings.max_refused_sources):
            self.fw.publisher.refusals_changed(holder)
        return self._refuse_claim(session, reason, holder=holder.id)

    async def _claim_elsewhere(self, session: Session) -> str | None:
        """Another replica's live session holds the identity: the same refusal as here."""
        assert session.identity is not None
        elsewhere = await self.fw.publisher.held_elsewhere(session)
        if elsewhere is None or self.closed:
            return None
        reason = f"identity held: {':'.join(session.identity)} is published by live {elsewhere}"
        return self._refuse_claim(session, reason)

    def _refuse_claim(self, session: Session, reason: str, **extra: Any) -> str:
        assert session.identity is not None
        identity = ":".join(session.identity)
        self.refuse("identity-held", reason, session=session.id, identity=identity, **extra)
        self.fail(
            f"{reason}. If that session is yours, stop it or let it end: this agent will get "
            "the identity once the holder is gone. If it is not yours, someone else has your "
            "token: revoke it.",
            "identity-held",
        )
        return reason

    async def _publish(self, session: Session) -> None:
        old = self.fw.registry.publish(session)
        self.fw.metrics.update_sessions(self.fw.registry)
        if old is not None:
            self.fw.metrics.takeovers.inc()
            log.info("takeover", session=session.id, replaced=old.id, user=session.user)
            old.close(f"replaced by session {session.id}", "replaced")
            await self.fw.publisher.unpublish(old, f"replaced by session {session.id}")
        await self.fw.publisher.publish(session)
        log.info(
            "published",
            session=session.id,
            user=session.user,
            mode=session.mode,
            services={n: f.port for n, f in session.forwards.items()},
        )

    async def _revalidate(self, session: Session) -> None:
        """A revoked or expired token ends the session; a hub outage does not."""
        assert self.token is not None
        while True:
            await anyio.sleep(self.fw.settings.revalidate_interval)
            decision = await self.fw.authenticator.revalidate(session.user, self.token.reveal())
            if decision.outcome.value == "reject":
                self.fail(f"token no longer valid: {decision.reason}", "auth-revoked")
                return

    async def _finish(self, session: Session, reason: str) -> None:
        if session.challenge is not None:
            session.challenge.settle(False)
        was_published = self.fw.registry.remove(session)
        for port in [*self.reserved.values(), *self.busy]:
            self.fw.ports.release(port)
        self.reserved.clear()
        self.busy.clear()
        self.fw.metrics.ports_in_use.set(self.fw.ports.in_use)
        self.fw.metrics.forget(session)
        self.fw.metrics.update_sessions(self.fw.registry)
        self.fw.metrics.sessions_ended.labels(reason=_reason_code(reason)).inc()
        if was_published:
            await self.fw.publisher.unpublish(session, reason)
        log.info("session ended", session=session.id, user=session.user, reason=reason)
        if not self.closed:
            self.close(reason)
        if self._linger:
            with anyio.move_on_after(LINGER):
                await self._lost.wait()
            self._disconnect(reason)


def _reason_code(reason: str) -> str:
    """Bounded label values for the ended-sessions metric."""
    for prefix, code in (
        ("agent said bye", "bye"),
        ("replaced", "replaced"),
        ("identity held", "identity-held"),
        ("no heartbeat", "heartbeat-timeout"),
        ("no ready", "ready-timeout"),
        ("protocol error", "protocol-error"),
        ("token no longer valid", "token-revoked"),
        ("forwarder", "shutdown"),
        ("control channel", "channel-closed"),
        ("agent error", "agent-error"),
        ("internal error", "internal-error"),
    ):
        if reason.startswith(prefix):
            return code
    return "disconnected"


async def _listen(factory: Any, host: str, port: int, **options: Any) -> asyncssh.SSHAcceptor:
    try:
        return await asyncssh.create_server(factory, host, port, **options)
    except OSError as exc:
        raise ListenError("SSH", HostPort(host, port), exc) from None
