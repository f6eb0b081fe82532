"""Faults, each with a bound: the daemons as real processes, real Dask, real signals.

- The forwarder SIGKILLed while a Dask result streams through a tunnel: every agent (one
  supervising a real Dask scheduler with a worker, two stand-in services), left on its
  default backoff, is published again within 10 s of the forwarder's restart, and a new
  Dask client computes through the new tunnel.
- The local scheduler dying and returning under the agent: meanwhile in-cluster connections
  through the tunnel are closed at once (never hang), the agent reports the service down and
  up again, and the session is never reconnected.
- A partition between agent and forwarder, made with a network namespace and a veth pair the
  test creates (addresses of its own hosts only): the forwarder's keepalive declares the
  session dead within its bound, and the agent is published again within 5 s of the heal.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from tests.harness import (
    agent_settings,
    base_env,
    dask_scheduler_argv,
    dask_worker_argv,
    free_port,
    process,
    running_agent,
    wait_for,
)
from tests.test_processes import (
    AGENT,
    Keys,
    _quiet,
    agent_env,
    banner,
    dask_sum_of_squares,
    exit_status,
    forwarder,
    only_tunnel,
    port_range,
    service_argv,
    wait_until,
)
from tests.test_processes import keys as keys
from tests.test_tunnel import echo_roundtrip

pytestmark = pytest.mark.slow

REPUBLISHED_WITHIN = 10.0
# The agents' shipped defaults (the process tests shorten them).
DEFAULT_BACKOFF = {"backoff_initial": "0.5", "backoff_max": "30"}


def _transfers(address: str, done: list[int], failed: list[str], stop: threading.Event) -> None:
    """20 MB Dask results through the tunnel, one after another, until the line breaks."""
    import os

    from distributed import Client

    try:
        with Client(f"tcp://{address}", timeout="10s") as client:
            while not stop.is_set():
                size = len(client.submit(os.urandom, 20_000_000, pure=False).result(timeout=30))
                assert size == 20_000_000
                done.append(size)
    except Exception as exc:  # the forwarder's death, however Dask reports it
        failed.append(type(exc).__name__)


def test_forwarder_sigkill_mid_transfer(keys: Keys, tmp_path: Path) -> None:
    ssh_port, http_port, ports = free_port(), free_port(), port_range()
    sched, dash = free_port(), free_port()
    others = [free_port(), free_port()]

    def new_forwarder(n: int) -> contextlib.AbstractContextManager[Any]:
        return forwarder(
            keys, tmp_path / f"fw{n}.log", ssh_port=ssh_port, http_port=http_port, ports=ports
        )

    with contextlib.ExitStack() as stack:
        fw = stack.enter_context(new_forwarder(1))
        dask_env = agent_env(keys, fw, {"scheduler": sched, "dashboard": dash}, **DEFAULT_BACKOFF)
        agents = [
            stack.enter_context(
                process(
                    [AGENT, "--", *dask_scheduler_argv(sched, dash)], tmp_path / "a0.log", dask_env
                )
            )
        ]
        for i, port in enumerate(others, start=1):
            env = agent_env(keys, fw, {"scheduler": port}, pod_uid=f"uid-{i}", **DEFAULT_BACKOFF)
            agents.append(
                stack.enter_context(
                    process([AGENT, "--", *service_argv(keys, [port])], tmp_path / f"a{i}.log", env)
                )
            )
        stack.enter_context(
            process(dask_worker_argv(f"tcp://127.0.0.1:{sched}"), tmp_path / "w.log", base_env())
        )

        def all_published(fw: Any = fw) -> list[dict[str, Any]] | None:
            tunnels = fw.tunnels()
            return tunnels if len(tunnels) == 3 else None

        tunnels = wait_until(_quiet(all_published), "three tunnels", alive=agents)
        (dask_tunnel,) = [t for t in tunnels if t["identity"].startswith("alice:instance:")]

        done: list[int] = []
        failed: list[str] = []
        stop = threading.Event()
        mover = threading.Thread(
            target=_transfers,
            args=(dask_tunnel["services"]["scheduler"], done, failed, stop),
            daemon=True,
        )
        mover.start()
        try:
            wait_until(lambda: len(done) >= 1 or failed, "a first 20 MB result", alive=agents)
            assert not failed, failed
            # Mid-transfer: the next result is on its way now.
            fw.proc.signal(signal.SIGKILL)
            assert exit_status(fw.proc) == -signal.SIGKILL
            fw.proc.stop()
            killed = time.monotonic()
            mover.join(60)
            assert not mover.is_alive(), "the Dask client hung after the forwarder died"
        finally:
            stop.set()

        fw = stack.enter_context(new_forwarder(2))
        restarted = time.monotonic()
        tunnels = wait_until(
            _quiet(lambda: all_published(fw)),
            "all three agents published again",
            alive=agents,
            timeout=REPUBLISHED_WITHIN,
        )
        back = time.monotonic()
        print(
            f"\nSIGKILL after {len(done)} x 20 MB ({failed}): all 3 republished "
            f"{back - restarted:.2f}s after the restart ({back - killed:.2f}s after the kill)"
        )
        (dask_tunnel,) = [t for t in tunnels if t["identity"].startswith("alice:instance:")]
        assert dask_sum_of_squares(dask_tunnel["services"]["scheduler"], 50) == sum(
            x * x for x in range(50)
        )
        for agent in agents:
            assert agent.proc.poll() is None


async def echo_on(
    port: int, *, task_status: anyio.abc.TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
) -> None:
    """An echo service on a fixed port, until its cancel scope (handed back) is cancelled."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                while True:
                    await stream.send(b"E:" + await stream.receive())

    with anyio.CancelScope() as scope:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        async with listener:
            task_status.started(scope)
            await listener.serve(handle)


async def closed_cleanly(address: str) -> str:
    """Connect through the tunnel while nothing listens behind it: closed, never hung."""
    host, _, port = address.rpartition(":")
    with anyio.fail_after(10):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            with contextlib.suppress(anyio.BrokenResourceError, OSError):
                await stream.send(b"ping")
            try:
                data = await stream.receive()
            except anyio.EndOfStream:
                return "eof"
            except (anyio.BrokenResourceError, OSError):
                return "reset"
            raise AssertionError(f"answered while the service was down: {data!r}")


@pytest.mark.anyio
async def test_local_service_dies_and_returns_under_the_agent(tmp_path: Path) -> None:
    """The scheduler the agent forwards to dies and comes back; the session lives through it."""
    from tests.test_policy import forwarder as inproc_forwarder

    port = free_port()
    async with inproc_forwarder(tmp_path) as fw, anyio.create_task_group() as tg:
        service = await tg.start(echo_on, port)
        async with running_agent(agent_settings(fw, services=(("scheduler", port),))) as agent:
            (tunnel,) = fw.tunnels()
            address = tunnel["services"]["scheduler"]
            assert await echo_roundtrip(address) == b"E:ping"

            service.cancel()  # the scheduler dies
            t0 = time.monotonic()
            outcomes = [await closed_cleanly(address) for _ in range(5)]
            down_for = time.monotonic() - t0
            await wait_for(
                lambda: fw.tunnels()[0]["services_up"].get("scheduler") is False,
                30,
                "the agent to report the scheduler down",
            )

            service = await tg.start(echo_on, port)  # ...and comes back on its port
            t1 = time.monotonic()
            await wait_for(
                lambda: fw.tunnels()[0]["services_up"].get("scheduler") is True,
                30,
                "the agent to report the scheduler up",
            )
            assert await echo_roundtrip(address) == b"E:ping"
            back = time.monotonic() - t1
            assert agent.state.connects == 1
            assert [t["id"] for t in fw.tunnels()] == [tunnel["id"]]
        service.cancel()
    print(f"\nservice down: connects closed {outcomes} in {down_for:.2f}s; back in {back:.2f}s")


@contextlib.contextmanager
def partitionable_host() -> Iterator[tuple[str, str, str, str]]:
    """A network namespace of our own, joined to this one by a veth pair we create.

    Yields (namespace, host-side veth, namespace-side veth, our address toward it); the
    addresses are a /30 of 10.231.0.0/16 that no interface here uses. Everything is deleted
    at the end (deleting the namespace deletes the veth pair).
    """
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("no ip netns here")
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    tag = os.urandom(3).hex()
    subnet = next(
        n for n in (random.randrange(1, 250) for _ in range(100)) if f"10.231.{n}." not in used
    )
    ns, here, there = f"jt-{tag}", f"jta{tag}", f"jtb{tag}"
    ours, theirs = f"10.231.{subnet}.1", f"10.231.{subnet}.2"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True)

    try:
        run("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
    try:
        run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        run("ip", "link", "set", there, "netns", ns)
        run("ip", "addr", "add", f"{ours}/30", "dev", here)
        run("ip", "link", "set", here, "up")
        run("ip", "-n", ns, "addr", "add", f"{theirs}/30", "dev", there)
        run("ip", "-n", ns, "link", "set", there, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        yield ns, here, there, ours
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_partition_between_agent_and_forwarder(keys: Keys, tmp_path: Path) -> None:
    """Agent in a namespace of its own; the link cut: declared dead by keepalive, back on heal."""
    keepalive, count = 1.0, 3
    bound = keepalive * (count + 1) + 2.0  # asyncssh probes count times, then gives up
    with partitionable_host() as (ns, _here, there, ours):
        ssh_port, service_port = free_port(), free_port()
        listen = f"{ours}:{ssh_port}"
        with forwarder(
            keys,
            tmp_path / "fw.log",
            ssh_port=ssh_port,
            listen=listen,
            keepalive_interval=str(keepalive),
            keepalive_count_max=str(count),
            heartbeat_interval="30",  # so that keepalive, not the heartbeat, finds the loss
        ) as fw:
            env = agent_env(keys, fw, {"scheduler": service_port}, forwarder=listen)
            argv = ["ip", "netns", "exec", ns, AGENT, "--", *service_argv(keys, [service_port])]
            with process(argv, tmp_path / "agent.log", env) as agent:
                first = wait_until(_quiet(lambda: only_tunnel(fw)), "published", alive=[agent])
                subprocess.run(["ip", "-n", ns, "link", "set", there, "down"], check=True)
                cut = time.monotonic()
                wait_until(
                    _quiet(lambda: only_tunnel(fw) is None),
                    "the forwarder to declare the session dead",
                    alive=[agent],
                    timeout=bound + 10,
                )
                dead_after = time.monotonic() - cut
                subprocess.run(["ip", "-n", ns, "link", "set", there, "up"], check=True)
                healed = time.monotonic()
                second = wait_until(
                    _quiet(lambda: only_tunnel(fw)),
                    "published after the heal",
                    alive=[agent],
                    timeout=5.0,
                )
                back_after = time.monotonic() - healed
                assert second["id"] != first["id"]
                assert banner(second["services"]["scheduler"]).startswith("service ")
    print(
        f"\npartition: declared dead after {dead_after:.2f}s (bound {bound:.0f}s), "
        f"back {back_after:.2f}s after the heal"
    )
    assert dead_after <= bound
