"""Test harness: real forwarders, agents and Dask processes, and waiting with deadlines.

Nothing here mocks a component: forwarders and agents run either in-process
(the real classes, on real sockets) or as real subprocesses via their console
entry points; Dask schedulers and workers are real ``dask`` processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import asyncssh
from prometheus_client import CollectorRegistry

from daemons.agent.session import AgentIdentity, AgentSession
from daemons.agent.settings import AgentSettings
from daemons.forwarder.__main__ import build_forwarder, serve_forwarder_http
from daemons.forwarder.server import Forwarder
from daemons.forwarder.sessions import MemoryPublisher, Publisher
from daemons.forwarder.settings import ForwarderSettings
from shared import config, hostkeys
from shared.auth import TokenFileVerifier, TokenVerifier
from shared.config import HostPort, Secret
from shared.metrics import new_registry

DEADLINE = 60.0  # generous: tests must pass on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(
    predicate: Callable[[], object | Awaitable[object]],
    timeout: float = DEADLINE,
    what: str = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = anyio.current_time() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await anyio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], object], timeout: float = DEADLINE, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - test URLs
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def get_tunnels(admin: HostPort | None) -> list[dict[str, Any]]:
    """``/tunnels`` from a standalone forwarder's admin address."""
    assert admin is not None, "no admin listener: /tunnels is served in standalone mode only"
    status, body = http_get(f"http://{admin}/tunnels")
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)
    return result


def write_token_file(path: Path, tokens: Mapping[str, str]) -> Path:
    path.write_text("# user token\n" + "".join(f"{u} {t}\n" for u, t in tokens.items()))
    path.chmod(0o600)
    return path


@dataclasses.dataclass
class RunningForwarder:
    forwarder: Forwarder
    ssh: HostPort
    http: HostPort
    fingerprint: str
    host_key_path: Path
    admin: HostPort | None = None  # /tunnels, standalone mode only

    def tunnels(self) -> list[dict[str, Any]]:
        return self.forwarder.tunnels()


def _port_range() -> config.PortRange:
    """A random block of 100 listener ports, so concurrent test runs rarely share one."""
    low = 30000 + 100 * random.randrange(27)  # below the ephemeral range (32768+)
    return config.PortRange(low, low + 99)


def forwarder_settings(tmp: Path, **overrides: Any) -> ForwarderSettings:
    base: dict[str, Any] = {
        "listen": HostPort("127.0.0.1", 0),
        "http": HostPort("127.0.0.1", 0),
        "admin_http": HostPort("127.0.0.1", 0),
        "host_key": tmp / "host_key",
        "auth": "token-file",
        "token_file": tmp / "tokens",
        "port_range": _port_range(),
        "service_host": "127.0.0.1",
        "heartbeat_interval": 1.0,
        "login_timeout": 10.0,
        "drain_timeout": 5.0,
    }
    base.update(overrides)
    return ForwarderSettings(**base)


@contextlib.asynccontextmanager
async def running_forwarder(
    settings: ForwarderSettings,
    verifier: TokenVerifier | None = None,
    registry: CollectorRegistry | None = None,
    publisher: Publisher | None = None,
) -> AsyncIterator[RunningForwarder]:
    """The real forwarder, in this process, on loopback ports of its own choosing.

    Pass ``registry`` to expose a verifier's own metrics (built on it) on ``/metrics`` too,
    ``publisher`` to publish elsewhere than in memory (e.g. Kubernetes Tunnels).
    """
    registry = registry if registry is not None else new_registry()
    if verifier is None:
        assert settings.token_file is not None
        verifier = TokenFileVerifier(settings.token_file)
    forwarder = build_forwarder(
        settings,
        registry,
        verifier=verifier,
        publisher=publisher if publisher is not None else MemoryPublisher(),
    )
    async with (
        serve_forwarder_http(forwarder, registry) as (http, admin),
        anyio.create_task_group() as tg,
    ):
        ssh = await tg.start(forwarder.run)
        try:
            yield RunningForwarder(
                forwarder,
                ssh,
                http,
                hostkeys.fingerprint(forwarder.host_key),
                settings.host_key,
                admin,
            )
        finally:
            tg.cancel_scope.cancel()


def agent_settings(
    forwarder: RunningForwarder | HostPort,
    fingerprint: str | None = None,
    *,
    user: str = "alice",
    token: str = "alice-token-0123456789",
    services: tuple[tuple[str, int], ...],
    **overrides: Any,
) -> AgentSettings:
    if isinstance(forwarder, RunningForwarder):
        fingerprint = fingerprint or forwarder.fingerprint
        forwarder = forwarder.ssh
    base: dict[str, Any] = {
        "forwarder": forwarder,
        "user": user,
        "token": Secret(token),
        "host_key_fingerprint": fingerprint,
        "services": services,
        "private_ip": "127.0.0.1",
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "identity_conflict_backoff_max": 1.0,
        "service_wait_timeout": 30.0,
    }
    base.update(overrides)
    return AgentSettings(**base)


@contextlib.asynccontextmanager
async def running_agent(
    settings: AgentSettings, identity: AgentIdentity | None = None, *, published: bool = True
) -> AsyncIterator[AgentSession]:
    """The real agent session, in this process; published before the block starts.

    ``published=False``: the block starts at once (e.g. an agent expected to be refused).
    """
    identity = identity or AgentIdentity(instance_id=os.urandom(8).hex(), private_ip="127.0.0.1")
    session = AgentSession(settings, identity, settings.read_token())
    async with anyio.create_task_group() as tg:
        tg.start_soon(session.run)
        if published:
            await wait_for(lambda: session.state.published, what="agent session published")
        try:
            yield session
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await session.bye("test done")
            tg.cancel_scope.cancel()


# Real processes


class Process:
    """A subprocess whose output goes to a file, stopped for sure at the end."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.json_lines() if e.get("event") == name), None)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, grace: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(grace)
        # Whatever the process started in its session goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def process(
    argv: list[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Iterator[Process]:
    proc = Process(argv, log, env, cwd)
    try:
        yield proc
    finally:
        proc.stop()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def dask_scheduler_argv(port: int, dashboard_port: int) -> list[str]:
    return python_module(
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-address",
        f"127.0.0.1:{dashboard_port}",
        "--no-show",
    )


def dask_worker_argv(address: str, name: str = "w1") -> list[str]:
    return python_module(
        "distributed.cli.dask_worker",
        address,
        "--nthreads",
        "1",
        "--nworkers",
        "1",
        "--name",
        name,
        "--no-dashboard",
        "--host",
        "127.0.0.1",
    )


def base_env() -> dict[str, str]:
    """A child's environment without anything of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JOBTUNNEL_", "JUPYTERHUB_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["DASK_DISTRIBUTED__ADMIN__TICK__LIMIT"] = "60s"
    return env


async def ssh_probe_connect(
    ssh: HostPort, user: str, token: str, fingerprint: str
) -> asyncssh.SSHClientConnection:
    """An asyncssh client with no jobtunnel logic: the raw peer for policy tests."""

    class _Pin(asyncssh.SSHClient):
        def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
            return hostkeys.matches(key, fingerprint)

    conn, _ = await asyncssh.create_connection(
        _Pin,
        ssh.host,
        ssh.port,
        username=user,
        password=token,
        known_hosts=([], [], []),
        client_keys=None,
        agent_path=None,
        config=[],
        preferred_auth="password",
    )
    return conn


__all__ = [
    "DEADLINE",
    "Process",
    "RunningForwarder",
    "agent_settings",
    "base_env",
    "dask_scheduler_argv",
    "dask_worker_argv",
    "forwarder_settings",
    "free_port",
    "get_tunnels",
    "http_get",
    "process",
    "python_module",
    "running_agent",
    "running_forwarder",
    "ssh_probe_connect",
    "wait_for",
    "wait_for_sync",
    "write_token_file",
]
