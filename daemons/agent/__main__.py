"""``jobtunnel-agent [--config F] [-- COMMAND ARGS...]``: the job side of a tunnel.

Wires settings, logging, metrics, the supervised child and the session. With a
command, the agent lives exactly as long as the child and exits with its
status; without one, until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import uuid
from pathlib import Path

import anyio

from daemons.agent import identity as job_identity
from daemons.agent import metrics
from daemons.agent.secrecy import child_environment, is_undumpable
from daemons.agent.session import AgentIdentity, AgentSession
from daemons.agent.settings import AgentSettings
from daemons.agent.supervisor import FORWARDED_SIGNALS, Child
from shared import logs
from shared import protocol as p
from shared.daemon import load_settings
from shared.metrics import new_registry, serve_http

log = logs.get_logger("jobtunnel.agent")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def build_identity(settings: AgentSettings) -> AgentIdentity:
    job = job_identity.job_identity_from_environment(os.environ)
    pod = None
    if settings.pod_uid and settings.pod_name and settings.pod_namespace:
        pod = p.PodInfo(
            namespace=settings.pod_namespace, name=settings.pod_name, uid=settings.pod_uid
        )
    private_ip = settings.private_ip
    if private_ip is None:
        try:
            private_ip = job_identity.detect_private_ip(
                settings.forwarder.host, settings.forwarder.port
            )
        except (OSError, ValueError) as exc:
            log.warning("private IP not detected; workers won't be routed to it", error=str(exc))
    return AgentIdentity(
        instance_id=uuid.uuid4().hex,
        job=None
        if job is None
        else p.JobInfo(
            global_job_id=job.global_job_id,
            cluster_id=job.cluster_id,
            proc_id=job.proc_id,
            schedd=job.schedd,
        ),
        pod=pod,
        private_ip=private_ip,
    )


async def serve(settings: AgentSettings, command: list[str]) -> int:
    token = settings.read_token()
    logs.redactor.register(token.reveal())
    identity = build_identity(settings)
    session = AgentSession(settings, identity, token)
    registry = new_registry()
    metrics.register(registry, session)
    log.info(
        "starting",
        forwarder=str(settings.forwarder),
        user=settings.user,
        job=identity.job.global_job_id if identity.job else None,
        pod=f"{identity.pod.namespace}/{identity.pod.name}" if identity.pod else None,
        private_ip=identity.private_ip,
        command=command or None,
        # Non-dumpable: processes of the job's uid can't read our memory or environ.
        undumpable=is_undumpable(),
    )
    status = 0
    async with contextlib.AsyncExitStack() as stack:
        if settings.http is not None:
            await stack.enter_async_context(
                serve_http(settings.http, registry, ready_checks={"session": session.ready_check})
            )
        signals = stack.enter_context(anyio.open_signal_receiver(*FORWARDED_SIGNALS))
        child = await Child.start(command, child_environment(os.environ)) if command else None
        async with anyio.create_task_group() as tg:

            async def relay_signals() -> None:
                async for signum in signals:
                    log.info(
                        "signal",
                        signal=signal.Signals(signum).name,
                        child=child.pid if child else None,
                    )
                    if signum in STOP_SIGNALS:
                        # Unpublish first: clients must not be sent to a dying scheduler.
                        tg.start_soon(session.bye, f"agent got {signal.Signals(signum).name}")
                    if child is None:
                        if signum in STOP_SIGNALS:
                            return
                    else:
                        child.send_signal(signum)

            async def run_session() -> None:
                def alive() -> bool:
                    return child is None or child.returncode is None

                up = await session.wait_for_services(alive)
                if alive():
                    await session.run(up)

            tg.start_soon(run_session)
            if child is None:
                await relay_signals()
            else:
                tg.start_soon(relay_signals)
                status = await child.wait()
            await session.bye(
                "child exited" if child else "agent stopping",
                exit_code=status if child else None,
            )
            tg.cancel_scope.cancel()
    log.info("exiting", status=status)
    return status


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in args_in:
        split = args_in.index("--")
        args_in, command = args_in[:split], args_in[split + 1 :]
    parser = argparse.ArgumentParser(
        prog="jobtunnel-agent",
        usage="jobtunnel-agent [--config FILE] [-- COMMAND ARGS...]",
        description="Tunnel this job's services to a jobtunnel forwarder (see README).",
    )
    parser.add_argument("--config", type=Path, help="TOML file; environment variables override it")
    args = parser.parse_args(args_in)
    settings = load_settings("jobtunnel-agent", AgentSettings, args.config)
    sys.exit(anyio.run(serve, settings, command, backend="asyncio"))


if __name__ == "__main__":
    main()
