"""A de-duplicating work queue keyed by Tunnel (``namespace/name``), client-go style.

A key is in the queue at most once however many events name it, and never processed by two
workers at once: a key added while it is being processed is marked dirty and handed out again
when the worker is done. That is what makes a level-triggered controller cheap (a burst of
events costs one reconcile) and safe (two reconciles of one Tunnel never race each other).
Failed keys come back after an exponential backoff per key.
"""

from __future__ import annotations

from collections import deque

import anyio
from anyio.abc import TaskGroup

BACKOFF_BASE = 0.1
BACKOFF_MAX = 30.0


class WorkQueue:
    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._failures: dict[str, int] = {}
        self._wakeup = anyio.Event()
        self._task_group: TaskGroup | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def bind(self, task_group: TaskGroup | None) -> None:
        """Where delayed adds sleep; without one, :meth:`add_after` adds at once."""
        self._task_group = task_group

    def add(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._wakeup.set()

    def add_after(self, key: str, delay: float) -> None:
        if self._task_group is None or delay <= 0:
            self.add(key)
            return

        async def later() -> None:
            await anyio.sleep(delay)
            self.add(key)

        self._task_group.start_soon(later)

    def add_rate_limited(self, key: str) -> float:
        """Re-add a failed key after its backoff; returns the delay chosen."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = float(min(BACKOFF_MAX, BACKOFF_BASE * 2**failures))
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        self._failures.pop(key, None)

    async def get(self, wait: float) -> str | None:
        """The next key (now marked processing); None when none came within ``wait`` s."""
        with anyio.move_on_after(wait):
            while not self._queue:
                # Every waiter shares one event until an add sets it; then a fresh one.
                if self._wakeup.is_set():
                    self._wakeup = anyio.Event()
                await self._wakeup.wait()
        if not self._queue:
            return None
        key = self._queue.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)
