"""Listener port allocation from the configured range.

Ports are handed out round-robin rather than lowest-first so that a port
just released (an old session being replaced) is not immediately reused: a
client still holding the old address then gets "connection refused" rather
than somebody else's service.
"""

from __future__ import annotations

from shared.config import PortRange


class PortsExhausted(Exception):
    """Every port of the range is in use."""


class PortAllocator:
    def __init__(self, ports: PortRange) -> None:
        self._range = ports
        self._in_use: set[int] = set()
        self._next = ports.low

    @property
    def in_use(self) -> int:
        return len(self._in_use)

    @property
    def capacity(self) -> int:
        return len(self._range)

    def reserve(self) -> int:
        for _ in range(len(self._range)):
            port = self._next
            self._next = port + 1 if port < self._range.high else self._range.low
            if port not in self._in_use:
                self._in_use.add(port)
                return port
        raise PortsExhausted(f"all {len(self._range)} ports of {self._range} are in use")

    def release(self, port: int) -> None:
        self._in_use.discard(port)
