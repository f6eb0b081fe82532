"""The agent's child process: the service the job exists for (``dask scheduler``).

The agent is the job's main process, so it must behave like one: signals go to
the child, and the job's exit status is the child's.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Mapping, Sequence

import anyio
from anyio.abc import Process

from shared.logs import get_logger

log = get_logger("jobtunnel.agent.supervisor")

# What a job wrapper, HTCondor or a user may send and the child should see.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def exit_status(returncode: int) -> int:
    """A shell's convention: killed by signal N exits 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Child:
    def __init__(self, process: Process, argv: Sequence[str]) -> None:
        self._process = process
        self.argv = list(argv)

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        process = await anyio.open_process(
            list(argv), stdin=None, stdout=None, stderr=None, env=dict(env)
        )
        log.info("child started", pid=process.pid, argv=list(argv))
        return cls(process, argv)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def send_signal(self, signum: int) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.Signals(signum))

    async def wait(self) -> int:
        returncode = await self._process.wait()
        status = exit_status(returncode)
        log.info("child exited", pid=self.pid, returncode=returncode, status=status)
        return status

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.send_signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            return await self.wait()
        self.send_signal(signal.SIGKILL)
        return await self.wait()
