"""The agent's side of a session: dial, verify, announce, forward, heartbeat, repeat.

One :class:`AgentSession` lives as long as the agent. Each connection attempt
runs :meth:`AgentSession._connect_once` to its end (drain, error, network
loss); the loop around it reconnects with exponential backoff and full
jitter, so a forwarder restart does not see every job of a pool at once.

When the forwarder says another session holds our identity (``replaced``: we were
taken for dead; ``identity-held``: the holder is alive) the agent never stands down
for good: a stolen token must not be able to switch a job's tunnel off silently.
It says so at error level and in ``jobtunnel_agent_identity_conflict*``, and keeps
retrying with the same backoff, capped at ``identity_conflict_backoff_max``; the
forwarder only lets it back once the other holder is gone, so two live claimants
never take the identity from each other in turn.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncssh

from daemons.agent.settings import AgentSettings
from shared import hostkeys
from shared import protocol as p
from shared.config import ConfigError, Secret
from shared.daemon import leaves
from shared.logs import get_logger, redactor

log = get_logger("jobtunnel.agent")

AGENT_VERSION = "0.1.0"
WELCOME_TIMEOUT = 15.0
# Error codes saying that another session holds this agent's identity.
IDENTITY_CONFLICT_CODES = frozenset({"replaced", "identity-held"})


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """What the agent claims in ``hello``; the forwarder and reconciler verify it."""

    instance_id: str
    job: p.JobInfo | None = None
    pod: p.PodInfo | None = None
    private_ip: str | None = None


@dataclass(slots=True)
class AgentState:
    """What ``/readyz`` and the tests look at."""

    connected: bool = False
    published: bool = False
    session_id: str | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    connects: int = 0
    last_rtt: float | None = None
    connections_forwarded: int = 0
    services_up: dict[str, bool] = field(default_factory=dict)
    # True from a ``replaced``/``identity-held`` until we are published again.
    identity_conflict: bool = False
    identity_conflicts: int = 0
    last_conflict: str | None = None  # the forwarder's message, for /readyz


class _Drained(Exception):
    """The forwarder asked us to reconnect (it is stopping)."""


class _Fatal(Exception):
    """The forwarder refused us for a reason a reconnect won't fix soon."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class _Client(asyncssh.SSHClient):
    """What the forwarder says during login (why a token was refused) goes to the log."""

    def auth_banner_received(self, msg: str, lang: str) -> None:
        log.error("forwarder refused this token", reason=msg.strip()[:1000])


class _HostKeyCheck(_Client):
    """Pins the forwarder's host key by fingerprint: no trust on first use."""

    def __init__(self, pinned: str) -> None:
        self._pinned = pinned

    def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
        if hostkeys.matches(key, self._pinned):
            return True
        log.error(
            "host key mismatch: refusing to talk to this forwarder",
            forwarder=f"{host}:{port}",
            presented=hostkeys.fingerprint(key),
            expected=self._pinned,
        )
        return False


async def _unwrapped(attempt: Awaitable[None]) -> None:
    """Re-raise a task group's failure as one exception, so ``except`` clauses can see it.

    A connection ending often fails two tasks at once (the reader sees the close, the
    heartbeat its aftermath): the forwarder's word (drain, fatal error) explains it best.
    """
    try:
        await attempt
    except BaseExceptionGroup as group:
        failures = leaves(group)
        if not all(isinstance(leaf, Exception) for leaf in failures):
            raise
        explained = [leaf for leaf in failures if isinstance(leaf, _Drained | _Fatal)]
        raise (explained or failures)[0] from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def probe(host: str, port: int, limit: float = 1.0) -> bool:
    """Does something accept TCP connections there?"""
    with anyio.move_on_after(limit):
        try:
            stream = await anyio.connect_tcp(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True
    return False


class AgentSession:
    def __init__(
        self,
        settings: AgentSettings,
        identity: AgentIdentity,
        token: Secret,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self._token = token
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.state = AgentState()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._writer: asyncssh.SSHWriter[bytes] | None = None
        self._conversation: p.Conversation | None = None
        self._stop_flag = False
        self._stopped = anyio.Event()
        self._heartbeat_seq = 0

    def _stop_requested(self) -> bool:
        return self._stop_flag

    def ready_check(self) -> str | None:
        if self.state.identity_conflict:
            return f"another session holds this agent's identity: {self.state.last_conflict}"
        if not self.state.published:
            return "not connected to the forwarder" if not self.state.connected else "not ready"
        return None

    async def wait_for_services(self, alive: Callable[[], bool] = lambda: True) -> list[str]:
        """Wait until the local services answer; after the timeout, go with those that do."""
        s = self.settings
        deadline = anyio.current_time() + s.service_wait_timeout
        next_note = anyio.current_time() + 10
        while True:
            up = [name for name, port in s.services if await probe(s.service_host, port)]
            if len(up) == len(s.services):
                return up
            now = anyio.current_time()
            if now >= deadline and up:
                log.warning("some services never answered", up=up, timeout=s.service_wait_timeout)
                return up
            if now >= next_note:
                log.info("waiting for services", up=up, want=[n for n, _ in s.services])
                next_note = now + 10
            if not alive():
                return up
            await anyio.sleep(0.2)

    async def run(self, services: Sequence[str] | None = None) -> None:
        """Keep a published session up until :meth:`bye` is called."""
        names = list(services) if services is not None else [n for n, _ in self.settings.services]
        failures = 0
        while not self._stop_requested():
            started = anyio.current_time()
            ceiling = self.settings.backoff_max
            try:
                await _unwrapped(self._connect_once(names))
                failures = 0
            except _Drained:
                log.info("forwarder draining: reconnecting")
                failures = 0
                continue
            except _Fatal as exc:
                if exc.code in IDENTITY_CONFLICT_CODES:
                    self._identity_conflict(exc)
                    ceiling = self.settings.identity_conflict_backoff_max
                else:
                    log.error("refused by forwarder", reason=str(exc))
                failures += 1
            except (OSError, asyncssh.Error, p.ProtocolError, TimeoutError) as exc:
                if self._stop_requested():
                    break
                log.warning("connection lost", error=f"{type(exc).__name__}: {exc}")
                failures += 1
            finally:
                self._reset()
            if self._stop_requested():
                break
            # A connection that lived a while resets the backoff.
            if anyio.current_time() - started > 60:
                failures = min(failures, 1)
            delay = self._backoff(failures, ceiling)
            log.info("reconnecting", in_seconds=round(delay, 2), attempt=failures)
            with anyio.move_on_after(delay):
                await self._stopped.wait()
        log.info("session loop ended")

    def _identity_conflict(self, exc: _Fatal) -> None:
        """Someone else has our identity: say it loudly, every time, and keep trying."""
        self.state.identity_conflict = True
        self.state.identity_conflicts += 1
        self.state.last_conflict = str(exc)
        log.error(
            "another session holds this agent's identity: retrying with backoff",
            code=exc.code,
            reason=str(exc),
            conflicts=self.state.identity_conflicts,
            hint="a duplicate of this job, or someone else using this job's token",
        )

    def _backoff(self, failures: int, ceiling: float | None = None) -> float:
        s = self.settings
        top = s.backoff_max if ceiling is None else ceiling
        cap = min(top, s.backoff_initial * (2 ** max(0, failures - 1)))
        return self._rng.uniform(s.backoff_initial / 2, max(s.backoff_initial / 2, cap))

    def _current_token(self) -> Secret:
        """Re-read a token file at every connect: the job wrapper may rotate it."""
        if self.settings.token_file is None:
            return self._token
        try:
            self._token = self.settings.read_token()
            redactor.register(self._token.reveal())
        except ConfigError as exc:
            log.warning("token file unreadable, using the previous token", error=str(exc))
        return self._token

    def _connect_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {
            "username": s.user,
            "password": self._current_token().reveal(),
            "client_keys": None,
            "agent_path": None,
            "config": [],
            "preferred_auth": "password,keyboard-interactive",
            "keepalive_interval": s.keepalive_interval,
            "keepalive_count_max": 4,
            "connect_timeout": s.connect_timeout,
            "encoding": None,
            "encryption_algs": list(hostkeys.CIPHERS),
            "compression_algs": None,  # the payload is mostly already compressed or tiny
            "client_factory": _Client,
        }
        if s.host_key_fingerprint:
            options["known_hosts"] = ([], [], [])  # trust nothing, ask the client factory
            pinned = s.host_key_fingerprint
            options["client_factory"] = lambda: _HostKeyCheck(pinned)
        elif s.known_hosts:
            options["known_hosts"] = str(s.known_hosts)
        else:
            log.warning(
                "host key check disabled (insecure_skip_host_key_check): "
                "this job's token can be stolen by anyone in the network path",
                forwarder=str(s.forwarder),
            )
            options["known_hosts"] = None
        return options

    async def _connect_once(self, services: Sequence[str]) -> None:
        s = self.settings
        log.info("connecting", forwarder=str(s.forwarder), user=s.user)
        try:
            conn = await asyncssh.connect(
                s.forwarder.host, s.forwarder.port, **self._connect_options()
            )
        except asyncssh.PermissionDenied as exc:
            raise _Fatal(f"authentication failed: {exc.reason}") from None
        async with conn:
            self._conn = conn
            self.state.connected = True
            self.state.connects += 1
            writer, reader, _ = await conn.open_session(subsystem="jobtunnel", encoding=None)
            self._writer = writer
            conversation = p.Conversation(p.Role.AGENT)
            self._conversation = conversation
            ports = dict(s.services)
            self._send(
                p.Hello(
                    versions=p.PROTOCOL_VERSIONS,
                    agent_version=AGENT_VERSION,
                    instance_id=self.identity.instance_id,
                    job=self.identity.job,
                    pod=self.identity.pod,
                    private_ip=self.identity.private_ip,
                    services=tuple(p.ServiceSpec(name=n, port=ports[n]) for n in services),
                )
            )
            welcome = await self._await_welcome(reader)
            self.state.session_id = welcome.session_id
            bound: dict[str, int] = {}
            for name in services:
                bound[name] = await self._forward(conn, name, ports[name])
            # The welcome's ports are the plan; a port someone else held was replaced by
            # another when binding, and the forward's reply says which.
            self.state.addresses = {
                a.name: _address(a.host, bound.get(a.name, a.port)) for a in welcome.services
            }
            self._send(p.Ready(services=tuple(services)))
            self.state.published = True
            if self.state.identity_conflict:
                log.warning("identity back: this agent's session is published again")
            self.state.identity_conflict = False
            log.info(
                "tunnel ready",
                session=welcome.session_id,
                addresses=self.state.addresses,
                heartbeat_interval=welcome.heartbeat_interval,
            )
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeats, welcome.heartbeat_interval)
                try:
                    await self._read(reader)
                finally:
                    tg.cancel_scope.cancel()

    async def _await_welcome(self, reader: asyncssh.SSHReader[bytes]) -> p.Welcome:
        assert self._conversation is not None
        with anyio.fail_after(WELCOME_TIMEOUT):
            while True:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("forwarder closed the control channel before welcome")
                messages = self._conversation.receive_data(data)
                self._flush()
                for message in messages:
                    if isinstance(message, p.Welcome):
                        return message
                    if isinstance(message, p.Error):
                        raise _Fatal(f"{message.code}: {message.message}", message.code)

    async def _forward(self, conn: asyncssh.SSHClientConnection, name: str, port: int) -> int:
        """Ask for the service's forward; returns the port the forwarder really bound."""
        host = self.settings.service_host

        def session_factory(orig_host: str, orig_port: int) -> Awaitable[Any]:
            # Per connection, not per chunk: the bytes themselves stay in asyncssh.
            self.state.connections_forwarded += 1
            return conn.forward_connection(host, port)

        try:
            listener = await conn.create_server(
                session_factory, name, 0, window=hostkeys.FORWARD_WINDOW
            )
        except asyncssh.ChannelListenError as exc:
            raise _Fatal(f"forwarder refused the {name!r} forward: {exc}") from None
        return int(listener.get_port())

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await anyio.sleep(interval)
            services_up = {
                name: await probe(self.settings.service_host, port)
                for name, port in self.settings.services
            }
            for name, up in services_up.items():
                if self.state.services_up.get(name, True) != up:
                    log.warning("service changed", service=name, up=up)
                    self._send(p.ServiceStatus(name=name, up=up))
            self.state.services_up = services_up
            self._heartbeat_seq += 1
            self._send(
                p.Heartbeat(
                    seq=self._heartbeat_seq,
                    sent_at=time.time(),
                    counters=p.AgentCounters(
                        connections=self.state.connections_forwarded, services_up=services_up
                    ),
                )
            )

    async def _read(self, reader: asyncssh.SSHReader[bytes]) -> None:
        assert self._conversation is not None
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("control channel closed by the forwarder")
            messages = self._conversation.receive_data(data)
            self._flush()  # the pong to a ping, before anything else can delay it
            for message in messages:
                if isinstance(message, p.HeartbeatAck):
                    self.state.last_rtt = max(0.0, time.time() - message.sent_at)
                elif isinstance(message, p.Drain):
                    raise _Drained(message.reason)
                elif isinstance(message, p.Error):
                    if message.fatal:
                        raise _Fatal(f"{message.code}: {message.message}", message.code)
                    log.warning("forwarder error", code=message.code, message=message.message)

    def _flush(self) -> None:
        """Write what the conversation answered by itself (a ``pong``)."""
        if self._writer is None or self._conversation is None:
            return
        if data := self._conversation.data_to_send():
            self._writer.write(data)

    def _send(self, message: p.Message) -> None:
        conversation = self._conversation
        # Once either side closed the conversation (bye, fatal error), nothing more is sent.
        if self._writer is None or conversation is None:
            return
        if conversation.state is p.ConversationState.CLOSED:
            return
        self._writer.write(conversation.send(message))

    def _reset(self) -> None:
        self._conn = None
        self._writer = None
        self._conversation = None
        self.state.connected = False
        self.state.published = False

    async def bye(self, reason: str, exit_code: int | None = None) -> None:
        """Unpublish now (don't let the forwarder wait for a timeout) and stop reconnecting."""
        self._stop_flag = True
        self._stopped.set()
        conn, conversation = self._conn, self._conversation
        if conn is None or conversation is None:
            return
        if conversation.state is p.ConversationState.ESTABLISHED:
            try:
                self._send(p.Bye(reason=reason, exit_code=exit_code))
            except OSError as exc:
                # The connection died under us (the loop has not noticed yet): nothing
                # to unpublish through it, and the agent must still exit with the child's status.
                log.info("bye not sent: connection already gone", reason=reason, error=str(exc))
            else:
                log.info("bye sent", reason=reason)
                # The forwarder hangs up once it has read the bye. Closing first would
                # lose it now and then: asyncssh's close() ends in transport.abort(), a
                # TCP reset that can discard the frame before the forwarder reads it.
                with anyio.move_on_after(self.settings.bye_timeout):
                    await conn.wait_closed()
        with anyio.move_on_after(self.settings.bye_timeout):
            conn.close()
            await conn.wait_closed()
