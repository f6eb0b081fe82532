"""Python warnings as structured log lines: a daemon's stderr belongs to the daemon.

Dependencies warn whenever they like: ``cryptography`` deprecates DSA when asyncssh is
imported, long before logging exists. Left to Python, that is raw multi-line text on
stderr, in front of the daemon's JSON lines and of its one-line configuration error.
So a daemon's entry point calls :func:`hold` before it imports anything heavy, and
its startup calls :func:`release` once logging is configured: each held warning, and
every later one, becomes one log event with its category and module. A daemon that
stops on a bad setting calls neither and exits with its one line; what was held is
dropped with the process.

Standard library only: it must be importable before any dependency is.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

#: Bound on what is held before logging exists: a dependency warning in a loop at
#: import time must not grow memory without end. Beyond it, only a count is kept.
HOLD_LIMIT = 100


@dataclass(frozen=True)
class HeldWarning:
    category: str
    module: str
    message: str
    filename: str
    lineno: int


_held: list[HeldWarning] = []
_dropped = 0


def module_of(filename: str) -> str:
    """The imported module a warning's file belongs to (``asyncssh.crypto.dsa``), else its path."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return filename


def _showing_to(sink: Callable[[HeldWarning], None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that hands each warning, described, to ``sink``."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        sink(
            HeldWarning(
                category=f"{category.__module__}.{category.__qualname__}",
                module=module_of(filename),
                message=str(message),
                filename=filename,
                lineno=lineno,
            )
        )

    return show


def _keep(w: HeldWarning) -> None:
    global _dropped
    if len(_held) < HOLD_LIMIT:
        _held.append(w)
    else:
        _dropped += 1


def hold() -> None:
    """Keep warnings from now on, printed nowhere, until :func:`release`."""
    warnings.showwarning = _showing_to(_keep)


def held() -> list[HeldWarning]:
    return list(_held)


def release(log: Any) -> None:
    """Log what was held and route every later warning to ``log`` (a structlog logger)."""
    global _dropped

    def emit(w: HeldWarning) -> None:
        log.warning(
            "python warning",
            category=w.category,
            module=w.module,
            message=w.message,
            filename=w.filename,
            lineno=w.lineno,
        )

    warnings.showwarning = _showing_to(emit)
    for w in _held:
        emit(w)
    if _dropped:
        log.warning("python warnings dropped before logging started", count=_dropped)
    _held.clear()
    _dropped = 0
