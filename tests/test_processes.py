"""The daemons as real processes: their console scripts, real Dask, real signals.

Every process is started through ``tests.harness.process`` and stopped by the test
that started it. Nothing waits by sleeping: every wait polls a condition with a
generous deadline (tests must pass on a loaded 2-core machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from shared import hostkeys
from shared import protocol as p
from shared.config import HostPort
from tests.harness import (
    DEADLINE,
    Process,
    base_env,
    dask_scheduler_argv,
    dask_worker_argv,
    free_port,
    get_tunnels,
    http_get,
    process,
    ssh_probe_connect,
    wait_for_sync,
    write_token_file,
)

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FORWARDER = str(BIN / "jobtunnel-forwarder")
AGENT = str(BIN / "jobtunnel-agent")
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
# "Gone at once": far below the heartbeat timeout (3 x 30 s) the forwarder would otherwise use.
AT_ONCE = 5.0

# A stand-in for a scheduler: listens on the given ports (after an optional delay), greets
# every connection with "<tag> <port>", exits with the status a client asks for ("exit N"),
# and exits 7 on SIGTERM so the agent's exit status is recognisably the child's.
SERVICE = r"""
import json, os, signal, socket, sys, threading, time

ports = [int(x) for x in sys.argv[1].split(",")]
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
tag = os.environ.get("SERVICE_TAG", "service")
# SIGTERM stays blocked in every thread (threads inherit the mask) and the main thread
# takes it with sigwait(). With a handler and signal.pause(), the kernel may hand it to
# another thread (one starting a thread for a connection, say): the handler, which only
# the main thread runs, then waits for a wake-up of pause() that never comes.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
time.sleep(delay)
# Printed before listening: whoever connects, connects after this line is in the log.
print(json.dumps({"event": "service listening", "ports": ports}), flush=True)


def handle(conn, port):
    with conn:
        try:
            conn.sendall(f"{tag} {port}\n".encode())
            data = conn.makefile("rb").readline().decode()
        except OSError:
            return
        if data.startswith("exit "):
            os._exit(int(data.split()[1]))


def serve(server, port):
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()


for port in ports:
    server = socket.create_server(("127.0.0.1", port))
    threading.Thread(target=serve, args=(server, port), daemon=True).start()
signal.sigwait({signal.SIGTERM})
sys.exit(7)
"""


# Setup shared by every test: a token file, a host key, a spare host key.


@dataclasses.dataclass(frozen=True)
class Keys:
    tokens: Path
    host_key: Path
    fingerprint: str
    public_key: str  # OpenSSH one-line public key, for known_hosts files
    other_fingerprint: str
    service: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    tmp = tmp_path_factory.mktemp("keys")
    tokens = write_token_file(tmp / "tokens", TOKENS)
    key = hostkeys.load_or_generate(tmp / "host_key")
    other = hostkeys.load_or_generate(tmp / "other_key")
    service = tmp / "service.py"
    service.write_text(SERVICE)
    return Keys(
        tokens=tokens,
        host_key=tmp / "host_key",
        fingerprint=hostkeys.fingerprint(key),
        public_key=key.export_public_key("openssh").decode().strip(),
        other_fingerprint=hostkeys.fingerprint(other),
        service=service,
    )


# Small helpers around the harness.


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """A predicate that is simply false while the thing it asks is not up yet."""

    def predicate() -> Any:
        try:
            return fn()
        except (OSError, ValueError, AssertionError):
            return None

    return predicate


def wait_until(
    predicate: Callable[[], Any],
    what: str,
    *,
    alive: Sequence[Process] = (),
    timeout: float = DEADLINE,
) -> Any:
    """wait_for_sync, failing at once (with the log) if a process that must live has died."""

    def check() -> Any:
        for proc in alive:
            if proc.proc.poll() is not None:
                raise AssertionError(
                    f"{proc.argv[0]} exited ({proc.proc.returncode}) while waiting for {what}:\n"
                    + proc.log()[-4000:]
                )
        return predicate()

    return wait_for_sync(check, timeout=timeout, what=what)


def exit_status(proc: Process, timeout: float = DEADLINE) -> int:
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{proc.argv} still running after {timeout}s:\n{proc.log()[-4000:]}"
        ) from None


def port_range() -> str:
    """A range of our own, below the ephemeral ports, so parallel runs rarely meet."""
    low = random.randrange(20000, 29900, 100)
    return f"{low}-{low + 99}"


def banner(address: str, command: str | None = None, timeout: float = 10.0) -> str:
    """Connect to ``address`` (through a tunnel), read the service's greeting line."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        line = reader.readline().decode().strip()
        if command is not None:
            sock.sendall(command.encode() + b"\n")
        return line


def refused(address: str) -> bool:
    try:
        banner(address, timeout=5)
    except ConnectionRefusedError:
        return True
    return False


def metric(http: HostPort, name: str) -> float:
    status, body = http_get(f"http://{http}/metrics")
    assert status == 200
    match = re.search(rf"^{re.escape(name)}(?:{{}})? (\S+)$", body.decode(), re.M)
    return float(match[1]) if match else 0.0


@dataclasses.dataclass
class Forwarder:
    proc: Process
    ssh: HostPort
    http: HostPort
    admin: HostPort

    def tunnels(self) -> list[dict[str, Any]]:
        return get_tunnels(self.admin)

    def metric(self, name: str) -> float:
        return metric(self.http, name)


@contextlib.contextmanager
def forwarder(
    keys: Keys,
    log: Path,
    *,
    ssh_port: int | None = None,
    http_port: int | None = None,
    admin_port: int | None = None,
    ports: str | None = None,
    **env: str,
) -> Iterator[Forwarder]:
    ssh = HostPort("127.0.0.1", ssh_port or free_port())
    http = HostPort("127.0.0.1", http_port or free_port())
    admin = HostPort("127.0.0.1", admin_port or free_port())
    environ = base_env() | {
        "JOBTUNNEL_LISTEN": str(ssh),
        "JOBTUNNEL_HTTP": str(http),
        "JOBTUNNEL_ADMIN_HTTP": str(admin),
        "JOBTUNNEL_HOST_KEY": str(keys.host_key),
        "JOBTUNNEL_AUTH": "token-file",
        "JOBTUNNEL_TOKEN_FILE": str(keys.tokens),
        "JOBTUNNEL_PORT_RANGE": ports or port_range(),
        "JOBTUNNEL_SERVICE_HOST": "127.0.0.1",
        "JOBTUNNEL_HEARTBEAT_INTERVAL": "2",
        "JOBTUNNEL_DRAIN_TIMEOUT": "3",
        "JOBTUNNEL_LOG_LEVEL": "debug",
    }
    environ |= {f"JOBTUNNEL_{k.upper()}": v for k, v in env.items()}
    with process([FORWARDER], log, environ) as proc:
        fw = Forwarder(proc, ssh, http, admin)
        wait_until(
            _quiet(lambda: http_get(f"http://{http}/readyz")[0] == 200),
            "the forwarder to be ready",
            alive=[proc],
        )
        yield fw


def agent_env(
    keys: Keys,
    fw: Forwarder,
    services: dict[str, int],
    *,
    user: str = "alice",
    pod_uid: str | None = None,
    **env: str,
) -> dict[str, str]:
    environ = base_env() | {
        "JOBTUNNEL_FORWARDER": str(fw.ssh),
        "JOBTUNNEL_USER": user,
        "JUPYTERHUB_API_TOKEN": TOKENS[user],
        "JOBTUNNEL_HOST_KEY_FINGERPRINT": keys.fingerprint,
        "JOBTUNNEL_SERVICES": ",".join(f"{n}={p}" for n, p in services.items()),
        "JOBTUNNEL_PRIVATE_IP": "127.0.0.1",
        "JOBTUNNEL_BACKOFF_INITIAL": "0.2",
        "JOBTUNNEL_BACKOFF_MAX": "1",
    }
    if pod_uid is not None:
        environ |= {
            "JOBTUNNEL_POD_NAMESPACE": "dask-alice",
            "JOBTUNNEL_POD_NAME": "cluster-scheduler",
            "JOBTUNNEL_POD_UID": pod_uid,
        }
    return environ | {f"JOBTUNNEL_{k.upper()}": v for k, v in env.items()}


def service_argv(keys: Keys, ports: Sequence[int], delay: float = 0.0) -> list[str]:
    return [sys.executable, str(keys.service), ",".join(map(str, ports)), str(delay)]


def only_tunnel(fw: Forwarder) -> dict[str, Any] | None:
    tunnels = fw.tunnels()
    assert len(tunnels) <= 1, tunnels
    return tunnels[0] if tunnels else None


def no_address_in_use(*procs: Process) -> None:
    for proc in procs:
        text = proc.log()
        assert "already in use" not in text.lower(), text[-4000:]
        assert '"port busy"' not in text, text[-4000:]


def dask_sum_of_squares(address: str, n: int = 200) -> int:
    from distributed import Client

    with Client(f"tcp://{address}", timeout="20s") as client:
        client.wait_for_workers(1, timeout=DEADLINE)
        futures = client.map(lambda x: x * x, range(n))
        return int(client.submit(sum, futures).result(timeout=DEADLINE))


# 1. The whole Dask chain.


def test_dask_chain_through_the_tunnel(keys: Keys, tmp_path: Path) -> None:
    sched, dash = free_port(), free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        t0 = time.monotonic()
        env = agent_env(keys, fw, {"scheduler": sched, "dashboard": dash})
        with (
            process(
                [AGENT, "--", *dask_scheduler_argv(sched, dash)], tmp_path / "agent.log", env
            ) as agent,
            process(
                dask_worker_argv(f"tcp://127.0.0.1:{sched}", "pool-worker"),
                tmp_path / "worker.log",
                base_env(),
            ) as worker,
        ):
            tunnel = wait_until(
                _quiet(lambda: only_tunnel(fw)), "the tunnel in /tunnels", alive=[agent, worker]
            )
            address = tunnel["services"]["scheduler"]
            assert address != f"127.0.0.1:{sched}"
            from distributed import Client

            client = wait_until(
                _quiet(lambda: Client(f"tcp://{address}", timeout="5s")),
                "a Dask client through the tunnel",
                alive=[agent, worker],
            )
            reachable = time.monotonic() - t0
            print(f"agent start -> reachable through the tunnel: {reachable:.2f} s")
            with client:
                client.wait_for_workers(1, timeout=DEADLINE)
                futures = client.map(lambda x: x * x, range(1000))
                total = client.submit(sum, futures).result(timeout=DEADLINE)
                assert total == sum(x * x for x in range(1000))
                workers = client.scheduler_info()["workers"]
                assert [w["name"] for w in workers.values()] == ["pool-worker"]

            dashboard = tunnel["services"]["dashboard"]
            status, body = http_get(f"http://{dashboard}/status")
            assert status == 200
            assert b"<html" in body.lower()
            # (/json/identity.json would be the obvious JSON check, but distributed 2026.8
            # answers it with a 500: TypeError serialising a tuple key. Not ours.)
            status, body = http_get(f"http://{dashboard}/info/main/workers.html")
            assert status == 200
            assert b"pool-worker" in body

            assert tunnel["user"] == "alice"
            assert tunnel["private_ip"] == "127.0.0.1"
            assert agent.proc.poll() is None


# 2. Forwarder restarts: drain (SIGTERM) and a crash (SIGKILL).


def test_agent_survives_forwarder_restarts(keys: Keys, tmp_path: Path) -> None:
    sched, dash = free_port(), free_port()
    ssh_port, http_port, ports = free_port(), free_port(), port_range()

    def new_forwarder(n: int) -> contextlib.AbstractContextManager[Forwarder]:
        return forwarder(
            keys,
            tmp_path / f"forwarder{n}.log",
            ssh_port=ssh_port,
            http_port=http_port,
            ports=ports,
        )

    with contextlib.ExitStack() as stack:
        fw = stack.enter_context(new_forwarder(1))
        env = agent_env(keys, fw, {"scheduler": sched, "dashboard": dash})
        agent = stack.enter_context(
            process([AGENT, "--", *dask_scheduler_argv(sched, dash)], tmp_path / "agent.log", env)
        )
        worker = stack.enter_context(
            process(dask_worker_argv(f"tcp://127.0.0.1:{sched}"), tmp_path / "w.log", base_env())
        )
        first = wait_until(_quiet(lambda: only_tunnel(fw)), "the first tunnel", alive=[agent])
        assert dask_sum_of_squares(first["services"]["scheduler"]) == sum(x * x for x in range(200))

        for n, signum in enumerate((signal.SIGTERM, signal.SIGKILL), start=2):
            connects = agent.log().count('"event": "tunnel ready"')
            fw.proc.signal(signum)
            assert exit_status(fw.proc) == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
            fw.proc.stop()
            # The agent noticed, by the drain message or by the lost connection.
            expected = (
                "forwarder draining: reconnecting"
                if signum == signal.SIGTERM
                else '"event": "connection lost"'
            )
            wait_until(
                lambda expected=expected: expected in agent.log(), f"the agent to see {signum!r}"
            )

            fw = stack.enter_context(new_forwarder(n))
            tunnel = wait_until(
                _quiet(lambda fw=fw: only_tunnel(fw)), f"the tunnel after {signum!r}", alive=[agent]
            )
            assert agent.log().count('"event": "tunnel ready"') == connects + 1
            assert dask_sum_of_squares(tunnel["services"]["scheduler"], n) == sum(
                x * x for x in range(n)
            )
        assert agent.proc.poll() is None
        assert worker.proc.poll() is None


# 3. A forwarder's SIGTERM is bounded, even with peers that ignore the drain.


async def _stubborn_agent(fw: Forwarder, fingerprint: str, connected: anyio.Event) -> None:
    """Says hello like an agent, then ignores everything, drain included."""
    conn = await ssh_probe_connect(fw.ssh, "bob", TOKENS["bob"], fingerprint)
    async with conn:
        writer, reader, _ = await conn.open_session(subsystem="jobtunnel", encoding=None)
        conversation = p.Conversation(p.Role.AGENT)
        writer.write(
            conversation.send(
                p.Hello(
                    versions=p.PROTOCOL_VERSIONS,
                    agent_version="stubborn",
                    instance_id="stubborn-1",
                    services=(),
                )
            )
        )
        connected.set()
        while await reader.read(65536):
            pass
        await conn.wait_closed()


@pytest.mark.anyio
async def test_forwarder_sigterm_is_bounded(keys: Keys, tmp_path: Path) -> None:
    port = free_port()
    drain_timeout = 3.0
    with forwarder(keys, tmp_path / "forwarder.log", drain_timeout=str(drain_timeout)) as fw:
        env = agent_env(keys, fw, {"scheduler": port})
        with process(
            [AGENT, "--", *service_argv(keys, [port])], tmp_path / "agent.log", env
        ) as agent:
            wait_until(_quiet(lambda: only_tunnel(fw)), "the tunnel", alive=[agent])
            connected = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stubborn_agent, fw, keys.fingerprint, connected)
                with anyio.fail_after(DEADLINE):
                    await connected.wait()
                started = time.monotonic()
                fw.proc.signal(signal.SIGTERM)
                status = await anyio.to_thread.run_sync(exit_status, fw.proc)
                took = time.monotonic() - started
                tg.cancel_scope.cancel()
            assert status == 0, fw.proc.log()[-4000:]
            assert took < drain_timeout + 5, f"forwarder took {took:.1f}s to stop"
            # The real agent left at once; the stubborn one was cut at the drain timeout.
            assert took >= drain_timeout - 0.5, took
            drained = next(e for e in fw.proc.json_lines() if e.get("event") == "drained")
            assert drained["remaining"] == 1
            wait_until(
                lambda: "forwarder draining: reconnecting" in agent.log(),
                "the agent to log the drain",
            )
            assert agent.proc.poll() is None


# 4. Takeover of one identity, coexistence of two.


def test_same_identity_takes_over_atomically(keys: Keys, tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        env_a = agent_env(keys, fw, {"scheduler": port_a}, pod_uid="uid-1") | {"SERVICE_TAG": "A"}
        env_b = agent_env(keys, fw, {"scheduler": port_b}, pod_uid="uid-1") | {"SERVICE_TAG": "B"}
        with process(
            [AGENT, "--", *service_argv(keys, [port_a])], tmp_path / "agent-a.log", env_a
        ) as agent_a:
            first = wait_until(_quiet(lambda: only_tunnel(fw)), "A's tunnel", alive=[agent_a])
            assert first["identity"] == "alice:pod:uid-1"
            assert banner(first["services"]["scheduler"]) == f"A {port_a}"
            takeovers = fw.metric("jobtunnel_forwarder_takeovers_total")
            # The old agent is frozen (a job cut off by the network, say): it cannot answer
            # the liveness challenge B's claim triggers, so B replaces it without its help,
            # and the test sees one takeover, not a ping-pong between two claimants.
            agent_a.signal(signal.SIGSTOP)
            try:
                with process(
                    [AGENT, "--", *service_argv(keys, [port_b])], tmp_path / "agent-b.log", env_b
                ) as agent_b:
                    second = wait_until(
                        _quiet(lambda: (t := only_tunnel(fw)) and t["id"] != first["id"] and t),
                        "B's tunnel replacing A's",
                        alive=[agent_b],
                    )
                    assert second["identity"] == "alice:pod:uid-1"
                    assert len(fw.tunnels()) == 1
                    assert banner(second["services"]["scheduler"]) == f"B {port_b}"
                    assert fw.metric("jobtunnel_forwarder_takeovers_total") == takeovers + 1
                    # The replaced session's listeners are closed (asyncssh closes them with
                    # the old connection, a moment after the takeover).
                    old_address = first["services"]["scheduler"]
                    if old_address != second["services"]["scheduler"]:
                        wait_until(lambda: refused(old_address), "A's old listener to close")
                    dead = fw.proc.event("holder failed the liveness challenge: replacing it")
                    assert dead is not None
                    assert dead["holder"] == first["id"]
                    assert dead["waited"] >= 5.0 - 0.1  # the default bound, all of it
                    takeover = fw.proc.event("takeover")
                    assert takeover is not None
                    assert (takeover["session"], takeover["replaced"]) == (
                        second["id"],
                        first["id"],
                    )
                    agent_a.signal(signal.SIGCONT)
                    agent_a.signal(signal.SIGTERM)
                    assert exit_status(agent_a) == 7
                    # B's tunnel is still the published one (its heartbeat time moves on).
                    wait_until(
                        _quiet(lambda: (only_tunnel(fw) or {}).get("id") == second["id"] or None),
                        "B's tunnel after A left",
                    )
                    no_address_in_use(fw.proc, agent_a, agent_b)
            finally:
                agent_a.signal(signal.SIGCONT)


def test_different_identities_coexist(keys: Keys, tmp_path: Path) -> None:
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        env_a = agent_env(keys, fw, {"scheduler": port_a}, pod_uid="uid-a") | {"SERVICE_TAG": "A"}
        env_b = agent_env(keys, fw, {"scheduler": port_b}, pod_uid="uid-b") | {"SERVICE_TAG": "B"}
        env_c = agent_env(keys, fw, {"scheduler": port_c}) | {"SERVICE_TAG": "C"}  # no pod
        with (
            process([AGENT, "--", *service_argv(keys, [port_a])], tmp_path / "a.log", env_a) as a,
            process([AGENT, "--", *service_argv(keys, [port_b])], tmp_path / "b.log", env_b) as b,
            process([AGENT, "--", *service_argv(keys, [port_c])], tmp_path / "c.log", env_c) as c,
        ):
            tunnels = wait_until(
                _quiet(lambda: len(t := fw.tunnels()) == 3 and t),
                "three tunnels",
                alive=[a, b, c],
            )
            by_identity = {t["identity"]: t for t in tunnels}
            assert set(by_identity) >= {"alice:pod:uid-a", "alice:pod:uid-b"}
            assert banner(by_identity["alice:pod:uid-a"]["services"]["scheduler"]) == (
                f"A {port_a}"
            )
            assert banner(by_identity["alice:pod:uid-b"]["services"]["scheduler"]) == (
                f"B {port_b}"
            )
            (instance,) = set(by_identity) - {"alice:pod:uid-a", "alice:pod:uid-b"}
            assert instance.startswith("alice:instance:")
            assert banner(by_identity[instance]["services"]["scheduler"]) == f"C {port_c}"
            assert fw.metric("jobtunnel_forwarder_takeovers_total") == 0
            no_address_in_use(fw.proc, a, b, c)


# 5. The agent leaves at once, with its child's status.


@pytest.mark.parametrize(
    ("how", "expected"),
    [("agent-sigterm", 7), ("child-exits", 3), ("child-killed", 128 + signal.SIGKILL)],
)
def test_agent_leaves_at_once_with_child_status(
    keys: Keys, tmp_path: Path, how: str, expected: int
) -> None:
    port = free_port()
    with forwarder(keys, tmp_path / "forwarder.log", heartbeat_interval="30") as fw:
        env = agent_env(keys, fw, {"scheduler": port})
        with process(
            [AGENT, "--", *service_argv(keys, [port])], tmp_path / "agent.log", env
        ) as agent:
            tunnel = wait_until(_quiet(lambda: only_tunnel(fw)), "the tunnel", alive=[agent])
            address = tunnel["services"]["scheduler"]
            started = time.monotonic()
            if how == "agent-sigterm":
                agent.signal(signal.SIGTERM)
            elif how == "child-exits":
                assert banner(address, command="exit 3").startswith("service ")
            else:
                child = agent.event("child started")
                assert child is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child["pid"], signal.SIGKILL)
            wait_until(lambda: fw.tunnels() == [], "the tunnel to leave", timeout=AT_ONCE)
            gone = time.monotonic() - started
            assert exit_status(agent) == expected, agent.log()[-4000:]
            print(f"{how}: tunnel gone after {gone:.2f} s")
            ended = fw.proc.event("session ended")
            assert ended is not None
            assert ended["reason"].startswith("agent said bye"), ended


# 6. Services that are not up yet.


def test_agent_waits_for_services_before_connecting(keys: Keys, tmp_path: Path) -> None:
    sched, dash = free_port(), free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        env = agent_env(keys, fw, {"scheduler": sched, "dashboard": dash})
        with process(
            [AGENT, "--", *service_argv(keys, [sched, dash], delay=3.0)],
            tmp_path / "agent.log",
            env,
        ) as agent:
            tunnel = wait_until(_quiet(lambda: only_tunnel(fw)), "the tunnel", alive=[agent])
            assert banner(tunnel["services"]["scheduler"]) == f"service {sched}"
            assert banner(tunnel["services"]["dashboard"]) == f"service {dash}"
            events = [e.get("event") for e in agent.json_lines()]
            assert events.index("service listening") < events.index("connecting"), events
            # One connection, made once everything answered: no failed attempts before.
            assert events.count("connecting") == 1, events
            assert fw.metric("jobtunnel_forwarder_sessions_started_total") == 1


# 7. Host key verification.


def test_wrong_fingerprint_never_publishes(keys: Keys, tmp_path: Path) -> None:
    port = free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        env = agent_env(keys, fw, {"scheduler": port})
        env["JOBTUNNEL_HOST_KEY_FINGERPRINT"] = keys.other_fingerprint
        with process(
            [AGENT, "--", *service_argv(keys, [port])], tmp_path / "agent.log", env
        ) as agent:
            # Two refusals: the agent keeps its policy across reconnects.
            wait_until(
                lambda: agent.log().count("host key mismatch") >= 2,
                "two host key mismatches",
                alive=[agent],
            )
            assert fw.tunnels() == []
            # The token was never offered to the unverified server.
            assert fw.metric("jobtunnel_forwarder_sessions_started_total") == 0
            assert TOKENS["alice"] not in agent.log()


@pytest.mark.parametrize("trusted", [True, False])
def test_known_hosts(keys: Keys, tmp_path: Path, trusted: bool) -> None:
    port = free_port()
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        other = hostkeys.load_or_generate(tmp_path / "other")
        public = keys.public_key if trusted else other.export_public_key("openssh").decode()
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{fw.ssh.port} {public.strip()}\n")
        env = agent_env(keys, fw, {"scheduler": port}, known_hosts=str(known_hosts))
        del env["JOBTUNNEL_HOST_KEY_FINGERPRINT"]
        with process(
            [AGENT, "--", *service_argv(keys, [port])], tmp_path / "agent.log", env
        ) as agent:
            if trusted:
                tunnel = wait_until(_quiet(lambda: only_tunnel(fw)), "the tunnel", alive=[agent])
                assert banner(tunnel["services"]["scheduler"]) == f"service {port}"
            else:
                wait_until(
                    lambda: agent.log().count('"event": "connection lost"') >= 2,
                    "two refused connections",
                    alive=[agent],
                )
                assert fw.tunnels() == []
                assert fw.metric("jobtunnel_forwarder_sessions_started_total") == 0
