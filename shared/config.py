"""Settings from a TOML file and the environment, validated once at start.

Each daemon describes its settings as a frozen dataclass whose fields carry an
:func:`option` marker (environment name, parser). :func:`load` reads the TOML
file, lets the environment win, and turns the first problem into a
:class:`ConfigError` whose message is one line naming the key, so an operator
can fix a unit file or a pod spec without reading a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from shared.sources import parse_network

ENV_PREFIX = "JOBTUNNEL_"

T = TypeVar("T")
Parser = Callable[[object], Any]


class ConfigError(Exception):
    """A setting is unknown or has a bad value; str() is one line naming it."""


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclasses.dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class PortRange:
    low: int
    high: int

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    def __len__(self) -> int:
        return self.high - self.low + 1


def option(
    parse: Parser,
    default: object = dataclasses.MISSING,
    *,
    env: str | tuple[str, ...] | None = None,
    help: str = "",
) -> Any:
    """Declare a setting: its parser, default and environment name(s).

    The environment name defaults to ``JOBTUNNEL_<FIELD>``; several names may be
    given, the first one set wins (e.g. the token from ``JUPYTERHUB_API_TOKEN``).
    """
    metadata = {"parse": parse, "env": env, "help": help}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list | dict | set):
        frozen = default
        return dataclasses.field(default_factory=lambda: type(frozen)(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def env_names(field: dataclasses.Field[Any]) -> tuple[str, ...]:
    env = field.metadata.get("env")
    if env is None:
        return (ENV_PREFIX + field.name.upper(),)
    return (env,) if isinstance(env, str) else tuple(env)


def load(
    cls: type[T],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from ``config_file`` (TOML) overridden by ``environ``."""
    environ = os.environ if environ is None else environ
    file_values: dict[str, object] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as fh:
                file_values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: not valid TOML: {exc}") from None

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in file_values:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{config_file}: unknown key '{key}' (known keys: {known})")

    values: dict[str, object] = {}
    for name, field in fields.items():
        parse: Parser = field.metadata["parse"]
        raw: object = dataclasses.MISSING
        source = ""
        for env in env_names(field):
            if env in environ:
                raw, source = environ[env], env
                break
        if raw is dataclasses.MISSING and name in file_values:
            raw, source = file_values[name], f"{config_file}: {name}"
        if raw is dataclasses.MISSING:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{env_names(field)[0]} ({name}) is required but not set")
            continue
        try:
            values[name] = parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return cls(**values)


def unknown_environment(cls: type[object], environ: Mapping[str, str]) -> list[str]:
    """``JOBTUNNEL_*`` variables no field reads: likely typos worth a warning."""
    known = {n for f in dataclasses.fields(cls) for n in env_names(f)}  # type: ignore[arg-type]
    return sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)


# Parsers. Each takes what TOML or the environment gives (str, int, list...) and
# raises ValueError with a message that says what was expected and what came.


def _text(raw: object) -> str:
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ValueError(f"expected a string, got {type(raw).__name__}")
    return str(raw).strip()


def string(raw: object) -> str:
    return _text(raw)


def optional_string(raw: object) -> str | None:
    text = _text(raw)
    return text or None


def secret(raw: object) -> Secret:
    text = _text(raw)
    if not text:
        raise ValueError("expected a non-empty secret, got an empty value")
    return Secret(text)


def path(raw: object) -> Path:
    text = _text(raw)
    if not text:
        raise ValueError("expected a path, got an empty value")
    return Path(text).expanduser()


def optional_path(raw: object) -> Path | None:
    text = _text(raw)
    return Path(text).expanduser() if text else None


def boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(raw).lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def positive_float(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expected a positive number of seconds, got {raw!r}")
    try:
        value = float(raw) if isinstance(raw, int | float) else float(_text(raw))
    except ValueError:
        raise ValueError(f"expected a positive number, got {raw!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"expected a positive number, got {raw!r}")
    return value


def positive_int(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"expected a positive integer, got {raw!r}")
    try:
        value = raw if isinstance(raw, int) else int(_text(raw))
    except ValueError:
        raise ValueError(f"expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {raw!r}")
    return value


def _port(text: str, what: str, *, low: int = 1) -> int:
    if not text.isdigit() or not low <= int(text) < 65536:
        raise ValueError(f"expected {what} in {low}..65535, got {text!r}")
    return int(text)


def listen_address(raw: object) -> HostPort:
    """Like :func:`host_port`, but port 0 means "any free port" (logged once bound)."""
    return host_port(raw, low=0)


def optional_listen_address(raw: object) -> HostPort | None:
    return listen_address(raw) if _text(raw) else None


def host_port(raw: object, *, low: int = 1) -> HostPort:
    text = _text(raw)
    match = re.fullmatch(
        r"\[(?P<v6>[^\]]+)\]:(?P<p1>[^:]*)|(?P<host>[^:\[\]]*):(?P<p2>[^:]*)", text
    )
    if not match:
        raise ValueError(f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {text!r}")
    host = match["v6"] or match["host"]
    if not host:
        raise ValueError(f"expected HOST:PORT with a host, got {text!r}")
    if match["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected an IPv6 address inside [...], got {host!r}") from None
    return HostPort(host, _port(match["p1"] or match["p2"] or "", "a port", low=low))


def port_range(raw: object) -> PortRange:
    text = _text(raw)
    low, sep, high = text.partition("-")
    if not sep:
        raise ValueError(f"expected LOW-HIGH, e.g. 40000-40999, got {text!r}")
    lo, hi = _port(low.strip(), "LOW"), _port(high.strip(), "HIGH")
    if lo > hi:
        raise ValueError(f"expected LOW <= HIGH, got {text!r}")
    return PortRange(lo, hi)


def string_list(raw: object) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else _text(raw).split(",")
    return tuple(_text(item) for item in items if _text(item))


def name_list(raw: object) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else _text(raw).split(",")
    names = tuple(_text(item) for item in items if _text(item))
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
            raise ValueError(f"expected lowercase names like 'scheduler', got {name!r}")
    return names


def cidr_list(raw: object) -> tuple[str, ...]:
    """``10.0.0.0/8,fd00::/8`` (or a TOML list) -> normalised CIDRs; empty admits nobody."""
    return tuple(str(parse_network(item)) for item in string_list(raw))


def services(raw: object) -> tuple[tuple[str, int], ...]:
    """``scheduler=8786,dashboard=8787`` (or a TOML table) -> ((name, port), ...)."""
    if isinstance(raw, dict):
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    else:
        pairs = []
        for item in _text(raw).split(","):
            if not item.strip():
                continue
            name, sep, port = item.partition("=")
            if not sep:
                raise ValueError(f"expected NAME=PORT items, e.g. scheduler=8786, got {item!r}")
            pairs.append((name.strip(), port.strip()))
    if not pairs:
        raise ValueError("expected at least one NAME=PORT item")
    result = []
    seen = set()
    for name, port in pairs:
        if not name.strip():
            item = f"{name}={port}"
            raise ValueError(f"expected NAME=PORT items with a name, got {item!r}")
        (checked,) = name_list(name)
        if checked in seen:
            raise ValueError(f"service {checked!r} given twice")
        seen.add(checked)
        result.append((checked, _port(port, f"a port for {checked!r}")))
    return tuple(result)


def choice(*allowed: str) -> Parser:
    def parse(raw: object) -> str:
        text = _text(raw)
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text

    return parse


def fingerprint(raw: object) -> str | None:
    text = _text(raw)
    if not text:
        return None
    if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}=?", text):
        raise ValueError(
            f"expected an OpenSSH fingerprint 'SHA256:<43 base64 chars>', got {text!r}"
        )
    return text.rstrip("=")
