"""The quickstart: the whole chain on one machine, with real processes only.

1. a forwarder in standalone mode (generated host key, generated token file);
2. an agent supervising a real ``dask scheduler`` (as the HTCondor job wrapper would);
3. a real ``dask worker`` attached to the scheduler's private address (the pool side);
4. a Dask client that finds the tunnel in the forwarder's ``/tunnels``, connects
   only through it, computes something, and prints the addresses and the result.

Everything it starts is stopped before it exits, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shared import warnlog

BIN = Path(sys.executable).parent
DEADLINE = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


@contextlib.contextmanager
def started(
    name: str, argv: list[str], env: dict[str, str], logs: Path
) -> Iterator[subprocess.Popen[bytes]]:
    log = (logs / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - our own loopback URL
        return json.load(resp)


def wait(what: str, predicate: Any, procs: dict[str, subprocess.Popen[bytes]], logs: Path) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(
                    f"demo: {name} exited ({proc.returncode}) while waiting for {what}:\n{tail}"
                )
        with contextlib.suppress(OSError, ValueError):
            result = predicate()
            if result:
                return result
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out after {DEADLINE:.0f}s waiting for {what} (logs in {logs})")


def main() -> int:
    # Dependencies may warn while they import (cryptography under asyncssh): that is not
    # the demo's output. Held and counted in one line, as the daemons log them.
    warnlog.hold()
    from distributed import Client

    from shared import hostkeys

    if noise := warnlog.held():
        kinds = ", ".join(sorted({w.category.rsplit(".", 1)[-1] for w in noise}))
        say(f"{len(noise)} dependency warnings while importing ({kinds}), not shown")

    work = Path(tempfile.mkdtemp(prefix="jobtunnel-demo-"))
    logs = work / "logs"
    logs.mkdir()
    token = secrets.token_urlsafe(32)
    (work / "tokens").write_text(f"# user token\ndemo {token}\n")
    (work / "tokens").chmod(0o600)
    host_key = hostkeys.load_or_generate(work / "host_key")
    ssh_port, http_port, admin_port, sched_port, dash_port = (free_port() for _ in range(5))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JOBTUNNEL_", "JUPYTERHUB_"))}

    fw_env = base | {
        "JOBTUNNEL_LISTEN": f"127.0.0.1:{ssh_port}",
        "JOBTUNNEL_HTTP": f"127.0.0.1:{http_port}",
        "JOBTUNNEL_ADMIN_HTTP": f"127.0.0.1:{admin_port}",
        "JOBTUNNEL_HOST_KEY": str(work / "host_key"),
        "JOBTUNNEL_AUTH": "token-file",
        "JOBTUNNEL_TOKEN_FILE": str(work / "tokens"),
        "JOBTUNNEL_PORT_RANGE": "40000-40999",
        "JOBTUNNEL_SERVICE_HOST": "127.0.0.1",
    }
    agent_env = base | {
        "JOBTUNNEL_FORWARDER": f"127.0.0.1:{ssh_port}",
        "JOBTUNNEL_USER": "demo",
        "JUPYTERHUB_API_TOKEN": token,
        "JOBTUNNEL_HOST_KEY_FINGERPRINT": hostkeys.fingerprint(host_key),
        "JOBTUNNEL_SERVICES": f"scheduler={sched_port},dashboard={dash_port}",
    }
    scheduler = [
        str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(sched_port),
        "--dashboard-address", f"127.0.0.1:{dash_port}",
    ]  # fmt: skip
    tunnels_url = f"http://127.0.0.1:{admin_port}/tunnels"
    say(f"working directory {work}")
    with contextlib.ExitStack() as stack:
        procs: dict[str, subprocess.Popen[bytes]] = {}
        procs["forwarder"] = stack.enter_context(
            started("forwarder", [str(BIN / "jobtunnel-forwarder")], fw_env, logs)
        )
        wait("the forwarder", lambda: get_json(tunnels_url) == [], procs, logs)
        say(f"forwarder up: ssh 127.0.0.1:{ssh_port}, http {tunnels_url}")
        t0 = time.monotonic()
        procs["agent"] = stack.enter_context(
            started("agent", [str(BIN / "jobtunnel-agent"), "--", *scheduler], agent_env, logs)
        )
        say(f"agent started, supervising: {' '.join(scheduler[1:])}")
        procs["worker"] = stack.enter_context(
            started(
                "worker",
                [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{sched_port}", "--nthreads", "2",
                 "--no-dashboard", "--host", "127.0.0.1", "--name", "pool-worker"],
                base,
                logs,
            )
        )  # fmt: skip
        tunnels = wait("the tunnel in /tunnels", lambda: get_json(tunnels_url), procs, logs)
        tunnel = tunnels[0]
        address = tunnel["services"]["scheduler"]
        client = wait(
            "a client through the tunnel",
            lambda: Client(f"tcp://{address}", timeout="3s"),
            procs,
            logs,
        )
        reachable = time.monotonic() - t0
        with client:
            say(f"agent start -> reachable through the tunnel: {reachable:.2f} s")
            say(
                f"tunnel {tunnel['id']} of user {tunnel['user']}, private IP {tunnel['private_ip']}"
            )
            for name, where in tunnel["services"].items():
                say(f"  {name:<10} reachable at {where}")
            say(f"  scheduler's own address tcp://127.0.0.1:{sched_port}: not used by the client")
            client.wait_for_workers(1, timeout=DEADLINE)
            futures = client.map(lambda x: x * x, range(1000))
            total = client.submit(sum, futures).result(timeout=DEADLINE)
            workers = list(client.scheduler_info()["workers"])
            say(f"sum of squares of 0..999, computed on {workers}: {total}")
            assert total == sum(x * x for x in range(1000))
            dashboard = tunnel["services"]["dashboard"]
            with urllib.request.urlopen(f"http://{dashboard}/status", timeout=10) as resp:
                say(
                    f"dashboard through the tunnel: http://{dashboard}/status -> HTTP {resp.status}"
                )
        procs["agent"].send_signal(signal.SIGTERM)
        wait("the tunnel to leave /tunnels", lambda: get_json(tunnels_url) == [], {}, logs)
        status = procs["agent"].wait(30)
        say(f"agent stopped with SIGTERM: tunnel gone from /tunnels, agent exit status {status}")
    say(f"all processes stopped; logs in {logs}")
    print(f"RESULT {total} REACHABLE_SECONDS {reachable:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
