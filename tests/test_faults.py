"""Faults, each with a bound: the daemons as real processes, real Dask, real signals.

- The forwarder SIGKILLed while a Dask result streams through a tunnel: every agent (one
  supervising a real Dask scheduler with a worker, two stand-in services), left on its
  default backoff, is published again within 10 s of the forwarder's restart, and a new
  Dask client computes through the new tunnel.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import base_env, dask_scheduler_argv, dask_worker_argv, free_port, process
from tests.test_processes import (
    AGENT,
    Keys,
    _quiet,
    agent_env,
    dask_sum_of_squares,
    exit_status,
    forwarder,
    port_range,
    service_argv,
    wait_until,
)
from tests.test_processes import keys as keys

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
