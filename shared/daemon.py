"""What every daemon's entry point does the same way: settings, logging, stop signals.

Kept here so the three composition roots stay about their own wiring, and so a
bad setting looks the same, one line and exit status 2, whichever daemon it is.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio

from shared import config, logs, warnlog


class Settings(Protocol):
    @property
    def log_level(self) -> str: ...

    def check(self) -> None: ...


S = TypeVar("S", bound=Settings)


class ListenError(OSError):
    """A listener could not bind (a port taken, an address not ours): the daemon stops on it.

    Raised as its own type so the daemon says it in one log line and exits 1, instead of a
    traceback on stderr.
    """

    def __init__(self, what: str, address: object, cause: OSError) -> None:
        super().__init__(cause.errno, f"cannot listen for {what} on {address}: {cause.strerror}")


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in a (nested) task-group failure, flattened."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def load_settings(prog: str, cls: type[S], config_file: Path | None) -> S:
    """Settings from TOML and the environment, or one line on stderr and exit 2.

    Python warnings held since the entry point (:mod:`daemons.launch`) go to the log
    from here on; with a bad setting they are never printed.
    """
    try:
        settings = config.load(cls, config_file=config_file)
        settings.check()
    except config.ConfigError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(level=settings.log_level)
    log = logs.get_logger(prog)
    warnlog.release(logs.get_logger("py.warnings"))
    for name in config.unknown_environment(cls, os.environ):
        log.warning("unknown environment variable ignored", name=name)
    return settings


async def stop_requested(log: Any) -> None:
    """Return at the first SIGTERM or SIGINT, logging which."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            return
