"""structlog setup shared by the daemons: JSON off a terminal, secrets never printed.

Redaction works two ways because either alone leaks: keys that name a secret
(``token``, ``password``...) are masked whatever their value, and values the
daemon registered as secret (its own token, say) are masked wherever they turn
up, in any key, nested or inside a longer string such as an exception message.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"

_SECRET_KEY = re.compile(r"(token|password|passwd|secret|authorization|api[_-]?key|cookie)", re.I)
# Credentials that travel inside free text (an HTTP header echoed in an error).
_INLINE = re.compile(r"(?i)\b(authorization:\s*(?:token|bearer)\s+)\S+")


class SecretRedactor:
    """structlog processor masking secret keys and registered secret values."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def register(self, *values: str) -> None:
        # Short strings would mask innocent text everywhere; real tokens are long.
        with self._lock:
            self._values = self._values | {v for v in values if len(v) >= 8}

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._values:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return _INLINE.sub(r"\1" + REDACTED, value)
        if isinstance(value, dict):
            return {k: self._scrub_item(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.scrub(v) for v in value)
        if isinstance(value, BaseException):
            return self.scrub(f"{type(value).__name__}: {value}")
        return value

    def _scrub_item(self, key: object, value: Any) -> Any:
        if isinstance(key, str) and _SECRET_KEY.search(key) and value not in (None, ""):
            return REDACTED
        return self.scrub(value)

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            event_dict[key] = self._scrub_item(key, event_dict[key])
        return event_dict


redactor = SecretRedactor()


def _scrub_exception(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # format_exc_info has turned exc_info into text by now: scrub that too.
    if "exception" in event_dict:
        event_dict["exception"] = redactor.scrub(event_dict["exception"])
    return event_dict


def configure(
    *,
    level: str = "info",
    json: bool | None = None,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and stdlib logging, which asyncssh uses) once per process."""
    redactor.register(*secrets)
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redactor,
        structlog.processors.format_exc_info,
        _scrub_exception,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # No caching: tests (and reconfiguration) must see the current processors.
        cache_logger_on_first_use=False,
    )
    # asyncssh logs every channel at INFO through stdlib logging; keep it quiet
    # and route what remains through the same redaction.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redactor,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("asyncssh").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
