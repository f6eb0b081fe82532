"""Log lines that an attacker cannot multiply: the first per (peer, reason) per interval.

A refused request costs the peer one packet and us one log line; at thousands per second
that is the attack. :class:`LogSummary` lets the first occurrence of a key through in each
interval and counts the rest; :meth:`LogSummary.flush` (called periodically) returns one
``(key, count)`` per key that was held back, which the caller logs as a single summary line.
At most ``max_keys`` keys are tracked: past that, new keys share one overflow key, so memory
and log volume stay bounded however many sources there are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str]  # (peer, reason): both bounded by the caller
OVERFLOW: Key = ("*", "*")


@dataclass(slots=True)
class _Window:
    started: float
    suppressed: int = 0


class LogSummary:
    def __init__(
        self,
        *,
        interval: float = 10.0,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._windows: dict[Key, _Window] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def should_log(self, key: Key) -> bool:
        """True for the first ``key`` of an interval; later ones are only counted."""
        now = self._clock()
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= self.max_keys:
                key = OVERFLOW
                window = self._windows.get(key)
                if window is None:
                    self._windows[key] = _Window(now, 1)
                    return False
            else:
                self._windows[key] = _Window(now)
                return True
        if now - window.started >= self.interval and not window.suppressed:
            window.started = now  # a quiet key: nothing held back, a new interval begins
            return True
        window.suppressed += 1
        return False

    def flush(self) -> list[tuple[Key, int]]:
        """Keys whose interval is over with held-back lines, and how many; forgets them."""
        now = self._clock()
        done: list[tuple[Key, int]] = []
        for key, window in list(self._windows.items()):
            if now - window.started >= self.interval:
                del self._windows[key]
                if window.suppressed:
                    done.append((key, window.suppressed))
        return done
