"""Soak: many agent sessions churning against one forwarder; its RSS and descriptors must stay flat.

    .venv/bin/python bench/soak.py [--sessions 200] [--seconds 600]

The forwarder runs as its own process (``jobtunnel-forwarder``, token file, loopback), so its
RSS and open descriptors are its own (``/proc/<pid>``). This process runs ``--sessions`` real
agent sessions (``AgentSession``, asyncssh) in a loop: connect, publish one service, pass a
few bytes through the tunnel, hold for a random 1-5 s, say bye, again; for ``--seconds``.
It prints the forwarder's RSS and descriptor count at the start (all sessions up once),
every minute, and at the end (all sessions gone), and the number of sessions completed.
Everything listens on loopback and stops at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemons.agent.session import AgentIdentity, AgentSession
from shared import hostkeys
from shared.config import HostPort
from tests.harness import (
    agent_settings,
    base_env,
    free_port,
    get_tunnels,
    http_get,
    process,
    wait_for,
    write_token_file,
)
from tests.test_tunnel import echo_roundtrip, echo_server

BIN = Path(sys.executable).parent
TOKEN = "soak-token-0123456789"


def usage(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def churn(
    ssh: HostPort, fingerprint: str, port: int, i: int, until: float, done: list[int]
) -> None:
    rng = random.Random(i)
    settings = agent_settings(
        ssh, fingerprint, user=f"u{i % 20}", token=TOKEN, services=(("scheduler", port),)
    )
    while time.monotonic() < until:
        session = AgentSession(
            settings, AgentIdentity(instance_id=f"soak-{i}"), settings.read_token()
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.run)
            with contextlib.suppress(AssertionError):
                await wait_for(lambda s=session: s.state.published, 60, "published")
                address = session.state.addresses["scheduler"]
                assert await echo_roundtrip(address) == b"S:ping"
                await anyio.sleep(rng.uniform(1, 5))  # a session's life, not a sync point
                done.append(1)
            with anyio.move_on_after(10):
                await session.bye("soak")
            tg.cancel_scope.cancel()


async def main(sessions: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_token_file(tmp / "tokens", {f"u{i}": TOKEN for i in range(20)})
        key = hostkeys.load_or_generate(tmp / "host_key")
        ssh, http = HostPort("127.0.0.1", free_port()), HostPort("127.0.0.1", free_port())
        admin = HostPort("127.0.0.1", free_port())
        env = base_env() | {
            "JOBTUNNEL_LISTEN": str(ssh),
            "JOBTUNNEL_HTTP": str(http),
            "JOBTUNNEL_ADMIN_HTTP": str(admin),
            "JOBTUNNEL_HOST_KEY": str(tmp / "host_key"),
            "JOBTUNNEL_TOKEN_FILE": str(tmp / "tokens"),
            "JOBTUNNEL_PORT_RANGE": "42000-42999",
            "JOBTUNNEL_SERVICE_HOST": "127.0.0.1",
            "JOBTUNNEL_LOG_LEVEL": "warning",
        }
        with process([str(BIN / "jobtunnel-forwarder")], tmp / "forwarder.log", env) as fw:
            await wait_for(lambda: _ready(http), 60, "the forwarder ready")
            pid = fw.proc.pid
            async with echo_server(b"S:") as port, anyio.create_task_group() as tg:
                done: list[int] = []
                until = time.monotonic() + seconds
                for i in range(sessions):
                    tg.start_soon(churn, ssh, hostkeys.fingerprint(key), port, i, until, done)
                await wait_for(lambda: len(done) >= sessions, 300, "every session up once")
                rss0, fds0 = usage(pid)
                print(f"start: RSS {rss0:.1f} MiB, {fds0} fds ({sessions} sessions up)", flush=True)
                while time.monotonic() < until:
                    with anyio.move_on_after(min(60, max(0.0, until - time.monotonic()))):
                        await anyio.sleep_forever()
                    rss, fds = usage(pid)
                    print(
                        f"  +{seconds - (until - time.monotonic()):.0f}s: RSS {rss:.1f} MiB, "
                        f"{fds} fds, {len(done)} sessions done",
                        flush=True,
                    )
            await wait_for(lambda: get_tunnels(admin) == [], 60, "every tunnel gone")
            rss1, fds1 = usage(pid)
            print(
                f"end: RSS {rss1:.1f} MiB ({rss1 - rss0:+.1f}), {fds1} fds ({fds1 - fds0:+d}); "
                f"{len(done)} sessions in {seconds:.0f}s",
                flush=True,
            )


def _ready(http: HostPort) -> bool:
    try:
        return http_get(f"http://{http}/readyz")[0] == 200
    except OSError:
        return False


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    anyio.run(main, args.sessions, args.seconds, backend="asyncio")
