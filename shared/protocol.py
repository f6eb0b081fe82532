"""The agent <-> forwarder control-channel protocol, without any I/O.

Wire format: the control channel (an SSH session channel, subsystem ``jobtunnel``) carries, in
each direction, a sequence of frames.  A frame is a 4-byte big-endian unsigned length ``n``
followed by exactly ``n`` bytes of UTF-8 JSON holding one object, with ``n <= MAX_FRAME_SIZE``
(64 KiB).  Every object has a string ``"type"`` naming the message (``"hello"``, ``"welcome"``,
...); its other keys are the message's fields, and optional fields that are ``None`` are
omitted.  Example::

    b'\\x00\\x00\\x00\\x36{"type":"drain","reason":"shutdown","retry_after":5.0}'

Decoding is strict (unknown types and fields, wrong types, duplicate keys and non-finite
numbers are all rejected) so that the two ends never disagree about what was said; anything
that is not understood raises `ProtocolError`, and nothing else, so one `except` clause in the
daemon is enough to answer a bad peer with an ``error`` frame and keep serving the others.

In the style of h11/wsproto the module only turns bytes into messages and back: the asyncio
daemons own the sockets, and the tests can drive every edge case without a network.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeAlias, cast

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "MESSAGE_TYPES",
    "NONCE_RE",
    "PING_VERSION",
    "PROTOCOL_VERSIONS",
    "SERVICE_NAME_RE",
    "AgentCounters",
    "Bye",
    "Conversation",
    "ConversationState",
    "Drain",
    "Error",
    "FrameDecoder",
    "Heartbeat",
    "HeartbeatAck",
    "Hello",
    "JobInfo",
    "Message",
    "Ping",
    "PodInfo",
    "Pong",
    "ProtocolError",
    "Ready",
    "Role",
    "ServiceAddress",
    "ServiceSpec",
    "ServiceStatus",
    "Welcome",
    "decode_payload",
    "encode",
    "from_dict",
    "negotiate",
    "to_dict",
]

PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)
# Version 2 adds ``ping``/``pong``: the liveness challenge a claimant of a published identity
# triggers. A v1 peer never sees them (the forwarder then waits for any frame instead).
PING_VERSION = 2
MAX_FRAME_SIZE = 65536
HEADER_SIZE = 4

SERVICE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
# Per-peer bounds: a session's services are few, and every string a peer sends ends up in
# memory, metrics or log lines, so none may be large (one 64 KiB frame is already a lot).
MAX_SERVICES = 8
MAX_NAME_LENGTH = 253  # identifiers: Kubernetes names, job ids, versions
MAX_TEXT_LENGTH = 1024  # free text: reasons, messages
# What an agent accepts from a forwarder: a heartbeat every 0.1 s would be a busy loop, one an
# hour a session nobody can tell is dead; an address is a host name or an IP literal.
MIN_HEARTBEAT_INTERVAL = 0.1
MAX_HEARTBEAT_INTERVAL = 3600.0
HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
# A challenge's nonce: short and printable, so it can be echoed and logged as it is.
NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_PLAIN_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")

# Integers are bounded so that peers written in languages with fixed-width integers (and JSON
# parsers that use doubles) agree on every value we accept.
_U63_MAX = 2**63 - 1
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


class ProtocolError(Exception):
    """Anything the peer (or, for `Conversation.send`, our own code) got wrong.

    Decode paths raise nothing else, so a daemon can turn any bad input into an ``error``
    frame (see `as_error`) without a catch-all that would also hide its own bugs.
    """

    code: str
    field: str | None
    decoded: tuple[Message, ...]

    def __init__(self, code: str, message: str = "", field: str | None = None) -> None:
        super().__init__(message or code)
        self.code = code
        self.field = field
        # Complete, valid messages that arrived in the same chunk before the bad one: a `bye`
        # followed by garbage should still unpublish the session promptly.
        self.decoded = ()

    def as_error(self, *, fatal: bool = True) -> Error:
        """The ``error`` message to send back, so both ends log the same precise reason."""
        return Error(code=self.code, message=str(self), fatal=fatal)


class _FieldError(Exception):
    """A validation failure whose location is still relative to the object being checked.

    Kept apart from `ProtocolError` so the outermost caller can prefix the message type
    (``hello.services[1].port``) once, whatever depth the failure happened at.
    """

    def __init__(self, code: str, path: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.path = path
        self.detail = detail

    def to_protocol_error(self, where: str) -> ProtocolError:
        if not self.path:
            location = where
        elif self.path.startswith("["):
            location = where + self.path
        else:
            location = f"{where}.{self.path}"
        return ProtocolError(self.code, f"{location}: {self.detail}", self.path or None)


def _describe(value: object) -> str:
    """A short, single-line, exception-free rendering of a rejected value for error text."""
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        try:
            return repr(value)
        except ValueError:  # too many digits for str() (CPython's int_max_str_digits)
            return f"an int of {value.bit_length()} bits"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- field validators -----------------------------------------------------------------------
# The same validators run on decoded JSON (from_dict) and on values passed to constructors
# (__post_init__), so a message that exists in memory can always be encoded and decoded back.


class _Validator:
    expected: str = "a value"

    def check(self, value: object, path: str) -> object:
        raise NotImplementedError

    def _bad(self, value: object, path: str) -> _FieldError:
        return _FieldError("bad-field", path, f"expected {self.expected}, got {_describe(value)}")


class _Int(_Validator):
    def __init__(self, lo: int, hi: int, expected: str) -> None:
        self.lo, self.hi, self.expected = lo, hi, expected

    def check(self, value: object, path: str) -> object:
        # bool is an int subclass, but `true` where a count is expected is a peer bug.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(value, path)
        if not self.lo <= value <= self.hi:
            raise self._bad(value, path)
        return int(value)


class _Float(_Validator):
    def __init__(
        self,
        minimum: float | None = None,
        *,
        exclusive: bool = False,
        maximum: float | None = None,
    ) -> None:
        self.minimum, self.exclusive, self.maximum = minimum, exclusive, maximum
        if minimum is None:
            self.expected = "a finite number"
        elif maximum is not None:
            self.expected = f"a number in {minimum:g}..{maximum:g}"
        else:
            self.expected = f"a finite number {'>' if exclusive else '>='} {minimum:g}"

    def check(self, value: object, path: str) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(value, path)
        try:
            number = float(value)
        except OverflowError:
            raise self._bad(value, path) from None
        if not math.isfinite(number):
            raise self._bad(value, path)
        if self.minimum is not None and (
            number < self.minimum or (self.exclusive and number == self.minimum)
        ):
            raise self._bad(value, path)
        if self.maximum is not None and number > self.maximum:
            raise self._bad(value, path)
        return number


class _Bool(_Validator):
    expected = "a boolean"

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, bool):
            raise self._bad(value, path)
        return value


class _Str(_Validator):
    def __init__(
        self,
        pattern: re.Pattern[str] | None = None,
        *,
        nonempty: bool = False,
        max_length: int = MAX_TEXT_LENGTH,
    ) -> None:
        self.pattern, self.nonempty, self.max_length = pattern, nonempty, max_length
        if pattern is not None:
            self.expected = f"a string matching ^{pattern.pattern}$"
        elif nonempty:
            self.expected = "a non-empty string"
        else:
            self.expected = "a string"

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, str):
            raise self._bad(value, path)
        try:
            # JSON "\ud800" escapes decode to lone surrogates, which could never be re-encoded.
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _FieldError(
                "bad-field", path, "string contains a lone surrogate (not valid Unicode)"
            ) from None
        if self.nonempty and not value:
            raise self._bad(value, path)
        if len(value) > self.max_length:
            raise _FieldError(
                "bad-field", path, f"string of {len(value)} characters, over {self.max_length}"
            )
        if self.pattern is not None and self.pattern.fullmatch(value) is None:
            raise self._bad(value, path)
        return str(value)


class _IPAddress(_Str):
    def __init__(self) -> None:
        super().__init__()
        self.expected = "an IPv4 or IPv6 address"

    def check(self, value: object, path: str) -> object:
        text = cast(str, super().check(value, path))
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise self._bad(value, path) from None
        return text


class _Optional(_Validator):
    def __init__(self, inner: _Validator) -> None:
        self.inner = inner
        self.expected = f"{inner.expected} or null"

    def check(self, value: object, path: str) -> object:
        return None if value is None else self.inner.check(value, path)


class _Tuple(_Validator):
    def __init__(
        self,
        item: _Validator,
        *,
        nonempty: bool = False,
        unique_names: bool = False,
        max_items: int = MAX_SERVICES,
    ) -> None:
        self.item, self.nonempty, self.unique_names = item, nonempty, unique_names
        self.max_items = max_items
        self.expected = "a non-empty array" if nonempty else "an array"

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, list | tuple):
            raise self._bad(value, path)
        if self.nonempty and not value:
            raise _FieldError("bad-field", path, "expected a non-empty array, got []")
        if len(value) > self.max_items:
            raise _FieldError(
                "bad-field", path, f"array of {len(value)} items, over {self.max_items}"
            )
        items = tuple(self.item.check(item, f"{path}[{i}]") for i, item in enumerate(value))
        if self.unique_names:
            seen: set[str] = set()
            for i, item in enumerate(items):
                name = item if isinstance(item, str) else cast(str, getattr(item, "name"))  # noqa: B009
                if name in seen:
                    where = f"{path}[{i}]" if isinstance(item, str) else f"{path}[{i}].name"
                    raise _FieldError("bad-field", where, f"duplicate service name {name!r}")
                seen.add(name)
        return items


class _Dict(_Validator):
    def __init__(self, key: _Validator, value: _Validator, *, max_items: int) -> None:
        self.key, self.value, self.max_items = key, value, max_items
        self.expected = "an object"

    def check(self, value: object, path: str) -> object:
        if not isinstance(value, Mapping):
            raise self._bad(value, path)
        if len(value) > self.max_items:
            raise _FieldError(
                "bad-field", path, f"object of {len(value)} entries, over {self.max_items}"
            )
        out: dict[object, object] = {}
        for k, v in value.items():
            item_path = f"{path}[{_describe(k)}]"
            out[self.key.check(k, item_path)] = self.value.check(v, item_path)
        return out


class _Nested(_Validator):
    def __init__(self, cls: type[_Model]) -> None:
        self.cls = cls
        self.expected = "an object"

    def check(self, value: object, path: str) -> object:
        if isinstance(value, self.cls):
            return value  # already validated when it was constructed
        if isinstance(value, Mapping):
            return _parse(self.cls, value, path)
        raise self._bad(value, path)


_SERVICE_NAME = _Str(SERVICE_NAME_RE)
_NAME = _Str(max_length=MAX_NAME_LENGTH)
_PORT = _Int(1, 65535, "an int in 1..65535")
_COUNT = _Int(0, _U63_MAX, "an int in 0..2**63-1")


class _Model:
    """Shared validation for every value object and message.

    ``_SCHEMA`` lists each field's validator in wire order; `__post_init__` runs it so that an
    invalid message cannot even be constructed, which keeps `encode` total.
    """

    __slots__ = ()
    _SCHEMA: ClassVar[Mapping[str, _Validator]]

    @classmethod
    def _where(cls) -> str:
        return cast(str, getattr(cls, "TYPE", cls.__name__))

    def __post_init__(self) -> None:
        for name, validator in self._SCHEMA.items():
            try:
                value = validator.check(getattr(self, name), name)
            except _FieldError as err:
                raise err.to_protocol_error(self._where()) from None
            object.__setattr__(self, name, value)


def _parse(cls: type[_Model], obj: Mapping[Any, object], path: str) -> _Model:
    schema = cls._SCHEMA
    for key in obj:
        if key not in schema:
            if isinstance(key, str) and _PLAIN_KEY_RE.fullmatch(key):
                raise _FieldError("unknown-field", _join(path, key), "unknown field")
            # The key is peer-controlled: quote it so it can't forge log lines or paths.
            raise _FieldError("unknown-field", f"{path}[{_describe(key)}]", "unknown field")
    kwargs: dict[str, object] = {}
    required = _REQUIRED[cls]
    for name, validator in schema.items():
        if name in obj:
            value = validator.check(obj[name], _join(path, name))
            if value is not None or name in required:
                kwargs[name] = value
        elif name in required:
            raise _FieldError("missing-field", _join(path, name), "missing required field")
    try:
        return cast(Any, cls)(**kwargs)  # type: ignore[no-any-return]
    except ProtocolError as err:  # pragma: no cover - every field was validated above
        raise _FieldError(err.code, path, str(err)) from None


# --- value objects --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobInfo(_Model):
    """The HTCondor job the agent claims to run in (a claim: the reconciler verifies it)."""

    global_job_id: str
    cluster_id: int
    proc_id: int
    schedd: str

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "global_job_id": _NAME,
        "cluster_id": _COUNT,
        "proc_id": _COUNT,
        "schedd": _NAME,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class PodInfo(_Model):
    """The Kubernetes pod the agent claims to serve (a claim: the reconciler verifies it)."""

    namespace: str
    name: str
    uid: str

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "namespace": _NAME,
        "name": _NAME,
        "uid": _NAME,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec(_Model):
    """A local service the agent wants exposed; the name doubles as the forward's listen host."""

    name: str
    port: int

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {"name": _SERVICE_NAME, "port": _PORT}


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAddress(_Model):
    """Where a service will be reachable inside the cluster, so the agent can advertise it.

    ``port`` 0: not chosen yet. The forwarder reserves a port only when the forward is
    requested (a ``hello`` alone must not hold ports), and the forward's reply names it.
    """

    name: str
    host: str
    port: int

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "name": _SERVICE_NAME,
        "host": _Str(HOST_RE, max_length=MAX_NAME_LENGTH),
        "port": _Int(0, 65535, "an int in 0..65535"),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentCounters(_Model):
    """Agent-side totals relayed into the forwarder's metrics (the forwarder can't see them)."""

    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    services_up: dict[str, bool] = field(default_factory=dict)

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "connections": _COUNT,
        "bytes_in": _COUNT,
        "bytes_out": _COUNT,
        "services_up": _Dict(_SERVICE_NAME, _Bool(), max_items=MAX_SERVICES),
    }


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(_Model):
    """The agent's opening claim; identity itself comes only from SSH authentication."""

    TYPE: ClassVar[str] = "hello"

    versions: tuple[int, ...]
    agent_version: str
    instance_id: str
    job: JobInfo | None = None
    pod: PodInfo | None = None
    private_ip: str | None = None
    services: tuple[ServiceSpec, ...] = ()

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "versions": _Tuple(_Int(1, _I32_MAX, "an int in 1..2**31-1"), nonempty=True, max_items=16),
        "agent_version": _NAME,
        "instance_id": _NAME,
        "job": _Optional(_Nested(JobInfo)),
        "pod": _Optional(_Nested(PodInfo)),
        "private_ip": _Optional(_IPAddress()),
        "services": _Tuple(_Nested(ServiceSpec), unique_names=True),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(_Model):
    """The forwarder accepts the session and tells the agent where its services will live."""

    TYPE: ClassVar[str] = "welcome"

    version: int
    session_id: str
    heartbeat_interval: float
    services: tuple[ServiceAddress, ...] = ()

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "version": _Int(1, _I32_MAX, "an int in 1..2**31-1"),
        "session_id": _Str(),
        "heartbeat_interval": _Float(MIN_HEARTBEAT_INTERVAL, maximum=MAX_HEARTBEAT_INTERVAL),
        "services": _Tuple(_Nested(ServiceAddress), unique_names=True),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(_Model):
    """Sent once the reverse forwards exist: publishing earlier would route into nothing."""

    TYPE: ClassVar[str] = "ready"

    services: tuple[str, ...] = ()

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "services": _Tuple(_SERVICE_NAME, unique_names=True),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(_Model):
    """Proves the agent is alive and carries its counters; ``sent_at`` lets it measure RTT."""

    TYPE: ClassVar[str] = "heartbeat"

    seq: int
    sent_at: float
    counters: AgentCounters = field(default_factory=AgentCounters)

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "seq": _COUNT,
        "sent_at": _Float(),
        "counters": _Nested(AgentCounters),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck(_Model):
    """Echoes the heartbeat so the agent computes RTT from its own clock only."""

    TYPE: ClassVar[str] = "heartbeat_ack"

    seq: int
    sent_at: float
    received_at: float

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "seq": _COUNT,
        "sent_at": _Float(),
        "received_at": _Float(),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceStatus(_Model):
    """A local service changed health, reported at once rather than at the next heartbeat."""

    TYPE: ClassVar[str] = "service"

    name: str
    up: bool
    detail: str = ""

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "name": _SERVICE_NAME,
        "up": _Bool(),
        "detail": _Str(),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Drain(_Model):
    """The forwarder is going away; the agent should reconnect (maybe to another replica)."""

    TYPE: ClassVar[str] = "drain"

    reason: str
    retry_after: float = 0.0

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "reason": _Str(),
        "retry_after": _Float(0.0),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(_Model):
    """The forwarder asks "are you alive?": someone else claims this session's identity (v2).

    Answered at once by the agent's `Conversation`; a holder that does not answer within
    the forwarder's bound is taken for dead and replaced.
    """

    TYPE: ClassVar[str] = "ping"

    nonce: str

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {"nonce": _Str(NONCE_RE)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(_Model):
    """The agent's answer to `Ping`, echoing its nonce so an old answer cannot pass (v2)."""

    TYPE: ClassVar[str] = "pong"

    nonce: str

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {"nonce": _Str(NONCE_RE)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(_Model):
    """The job is ending: unpublish now instead of waiting for a heartbeat timeout."""

    TYPE: ClassVar[str] = "bye"

    reason: str
    exit_code: int | None = None

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "reason": _Str(),
        "exit_code": _Optional(_Int(_I32_MIN, _I32_MAX, "an int in -2**31..2**31-1")),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Model):
    """Either side explains a failure before (if fatal) closing, so nothing fails silently."""

    TYPE: ClassVar[str] = "error"

    code: str
    message: str
    fatal: bool = True

    _SCHEMA: ClassVar[Mapping[str, _Validator]] = {
        "code": _Str(),
        "message": _Str(),
        "fatal": _Bool(),
    }


Message: TypeAlias = (
    Hello
    | Welcome
    | Ready
    | Heartbeat
    | HeartbeatAck
    | ServiceStatus
    | Drain
    | Ping
    | Pong
    | Bye
    | Error
)

_MESSAGE_CLASSES: tuple[type[Message], ...] = (
    Hello,
    Welcome,
    Ready,
    Heartbeat,
    HeartbeatAck,
    ServiceStatus,
    Drain,
    Ping,
    Pong,
    Bye,
    Error,
)
MESSAGE_TYPES: Mapping[str, type[Message]] = {cls.TYPE: cls for cls in _MESSAGE_CLASSES}

_MODEL_CLASSES: tuple[type[_Model], ...] = (
    JobInfo,
    PodInfo,
    ServiceSpec,
    ServiceAddress,
    AgentCounters,
    *_MESSAGE_CLASSES,
)
_REQUIRED: dict[type[_Model], frozenset[str]] = {
    cls: frozenset(
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is MISSING and f.default_factory is MISSING
    )
    for cls in _MODEL_CLASSES
}
for _cls in _MODEL_CLASSES:  # a forgotten validator would silently skip checking a field
    if set(_cls._SCHEMA) != {f.name for f in fields(_cls)}:  # type: ignore[arg-type]
        raise RuntimeError(f"{_cls.__name__}._SCHEMA does not match its fields")


# --- dict / bytes conversion ----------------------------------------------------------------


def _dump(value: object) -> object:
    if isinstance(value, _Model):
        out: dict[str, object] = {}
        for name in value._SCHEMA:
            item = getattr(value, name)
            if item is not None:
                out[name] = _dump(item)
        return out
    if isinstance(value, tuple):
        return [_dump(item) for item in value]
    if isinstance(value, dict):
        return {key: _dump(item) for key, item in value.items()}
    return value


def to_dict(msg: Message) -> dict[str, object]:
    """The JSON-ready form, for logs and tests as much as for `encode`."""
    if not isinstance(msg, _MESSAGE_CLASSES):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    body = cast(dict[str, object], _dump(msg))
    return {"type": msg.TYPE, **body}


def from_dict(obj: object) -> Message:
    """Validate a decoded JSON value strictly: everything in it must be understood."""
    if not isinstance(obj, Mapping):
        raise ProtocolError("not-an-object", f"expected a JSON object, got {_describe(obj)}")
    if "type" not in obj:
        raise ProtocolError("missing-field", "message has no 'type' field", "type")
    type_name = obj["type"]
    if not isinstance(type_name, str):
        raise ProtocolError(
            "bad-field", f"type: expected a string, got {_describe(type_name)}", "type"
        )
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise ProtocolError("unknown-type", f"unknown message type {_describe(type_name)}", "type")
    body = {key: value for key, value in obj.items() if key != "type"}
    try:
        return cast(Message, _parse(cls, body, ""))
    except _FieldError as err:
        raise err.to_protocol_error(type_name) from None


def encode(msg: Message) -> bytes:
    """One whole frame, refusing what the peer's decoder would reject as too large."""
    payload = json.dumps(
        to_dict(msg), separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if len(payload) > MAX_FRAME_SIZE:
        raise ProtocolError(
            "frame-too-large",
            f"{msg.TYPE}: encoded payload is {len(payload)} bytes, "
            f"over the {MAX_FRAME_SIZE}-byte limit",
        )
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last duplicate, other parsers the first: reject instead of guessing.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError("bad-json", f"invalid JSON: duplicate key {_describe(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise ProtocolError("bad-json", f"invalid JSON: {name} is not a JSON number")


def decode_payload(payload: bytes) -> Message:
    """Decode one frame's body (without the length header)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError("bad-utf8", f"frame is not valid UTF-8 (at byte {err.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise ProtocolError(
            "bad-json", f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except ValueError as err:  # e.g. an integer literal over CPython's digit limit
        raise ProtocolError("bad-json", f"invalid JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("bad-json", "invalid JSON: nested too deeply") from None
    return from_dict(obj)


class FrameDecoder:
    """Reassembles frames from however the transport happens to chunk the stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Message]:
        """All messages completed by ``data``; a partial frame stays buffered.

        After a `ProtocolError` the stream position is unknowable, so the decoder stays
        closed and every later call raises again with the first error's code.
        """
        if self._error is not None:
            first = self._error
            raise ProtocolError(
                first.code, f"decoder closed after earlier error: {first}", first.field
            )
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        pos = 0
        try:
            while len(buffer) - pos >= HEADER_SIZE:
                length = int.from_bytes(buffer[pos : pos + HEADER_SIZE], "big")
                if length > MAX_FRAME_SIZE:
                    # Decided on the header alone: never buffer a body we are going to refuse.
                    raise ProtocolError(
                        "frame-too-large",
                        f"frame announces {length} bytes, over the {MAX_FRAME_SIZE}-byte limit",
                    )
                end = pos + HEADER_SIZE + length
                if len(buffer) < end:
                    break
                payload = bytes(buffer[pos + HEADER_SIZE : end])
                pos = end
                messages.append(decode_payload(payload))
        except ProtocolError as err:
            self._error = err
            buffer.clear()
            err.decoded = tuple(messages)
            raise
        del buffer[:pos]
        return messages

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        """Whether an earlier error has made the stream undecodable."""
        return self._error is not None


def negotiate(offered: Iterable[int], supported: Iterable[int] = PROTOCOL_VERSIONS) -> int:
    """The highest version both sides speak, so new peers upgrade without a flag day."""
    offered_t, supported_t = tuple(offered), tuple(supported)
    common = set(offered_t) & set(supported_t)
    if not common:
        raise ProtocolError(
            "no-common-version",
            f"no common protocol version: peer offers {sorted(set(offered_t))}, "
            f"we support {sorted(set(supported_t))}",
        )
    return max(common)


# --- conversation state machine -------------------------------------------------------------


class Role(enum.Enum):
    AGENT = "agent"
    FORWARDER = "forwarder"


class ConversationState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    AWAIT_READY = "await-ready"
    ESTABLISHED = "established"
    CLOSED = "closed"


_SENDER: Mapping[type[Message], Role | None] = {
    Hello: Role.AGENT,
    Welcome: Role.FORWARDER,
    Ready: Role.AGENT,
    Heartbeat: Role.AGENT,
    HeartbeatAck: Role.FORWARDER,
    ServiceStatus: Role.AGENT,
    Drain: Role.FORWARDER,
    Ping: Role.FORWARDER,
    Pong: Role.AGENT,
    Bye: Role.AGENT,
    Error: None,  # either side
}

_S = ConversationState
# heartbeat_ack, drain and bye are also legal between welcome and ready: the agent may
# heartbeat while it registers its forwards, and either side may give up during that time.
# ping/pong too (and only from version 2 on, see `Conversation._check`).
_ALLOWED: Mapping[Role, Mapping[ConversationState, frozenset[type[Message]]]] = {
    Role.AGENT: {
        _S.AWAIT_HELLO: frozenset({Hello, Error}),
        _S.AWAIT_WELCOME: frozenset({Error}),
        _S.AWAIT_READY: frozenset({Ready, Heartbeat, ServiceStatus, Pong, Bye, Error}),
        _S.ESTABLISHED: frozenset({Heartbeat, ServiceStatus, Pong, Bye, Error}),
    },
    Role.FORWARDER: {
        _S.AWAIT_HELLO: frozenset({Error}),
        _S.AWAIT_WELCOME: frozenset({Welcome, Error}),
        _S.AWAIT_READY: frozenset({HeartbeatAck, Drain, Ping, Error}),
        _S.ESTABLISHED: frozenset({HeartbeatAck, Drain, Ping, Error}),
    },
}


class Conversation:
    """Legal message order on one control channel, seen from one side.

    Each direction closes independently (h11-style): after we send ``bye`` the peer's
    messages already in flight are still accepted, but nothing may follow the peer's own
    ``bye`` or fatal ``error``.  ``state`` is CLOSED as soon as either direction is.

    The agent's side answers a ``ping`` by itself: `receive_data` queues the ``pong`` and
    `data_to_send` hands it out, so the answer cannot wait on anything the daemon does.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self.peer_role = Role.FORWARDER if role is Role.AGENT else Role.AGENT
        self.version: int | None = None
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self._phase = ConversationState.AWAIT_HELLO
        self._decoder = FrameDecoder()
        self._we_closed = False
        self._they_closed = False
        self._receive_error: ProtocolError | None = None
        self._outgoing = bytearray()

    @property
    def state(self) -> ConversationState:
        if self._we_closed or self._they_closed:
            return ConversationState.CLOSED
        return self._phase

    @property
    def our_closed(self) -> bool:
        """We sent ``bye`` or a fatal ``error``."""
        return self._we_closed

    @property
    def their_closed(self) -> bool:
        """The peer sent ``bye`` or a fatal ``error``, or broke the protocol."""
        return self._they_closed

    def send(self, msg: Message) -> bytes:
        """Encode one of our messages, refusing what the peer would reject as out of order."""
        # After the peer broke the protocol we still owe it an explanation.
        may_explain = (
            isinstance(msg, Error) and self._receive_error is not None and not self._we_closed
        )
        if not may_explain:
            self._check(msg, self.role, closed=self._we_closed or self._they_closed)
        data = encode(msg)
        self._apply(msg, self.role)
        return data

    def data_to_send(self) -> bytes:
        """Frames the conversation wrote by itself (the ``pong`` to a ``ping``); then empty."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes) -> list[Message]:
        """Decode the peer's bytes and check that the messages come in a legal order."""
        if self._receive_error is not None:
            first = self._receive_error
            raise ProtocolError(
                first.code, f"channel closed after earlier error: {first}", first.field
            )
        decode_error: ProtocolError | None = None
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as err:
            decode_error = err
            messages = list(err.decoded)
        accepted: list[Message] = []
        for msg in messages:
            try:
                self._check(msg, self.peer_role, closed=self._they_closed)
                self._apply(msg, self.peer_role)
            except ProtocolError as err:
                raise self._fail(err, accepted) from None
            accepted.append(msg)
        if decode_error is not None:
            raise self._fail(decode_error, accepted)
        return accepted

    def _fail(self, err: ProtocolError, accepted: list[Message]) -> ProtocolError:
        self._receive_error = err
        self._they_closed = True
        err.decoded = tuple(accepted)
        return err

    def _check(self, msg: Message, sender: Role, *, closed: bool) -> None:
        owner = _SENDER[type(msg)]
        if owner is not None and owner is not sender:
            raise ProtocolError(
                "unexpected-message",
                f"unexpected {msg.TYPE!r} from {sender.value}: only the {owner.value} sends it",
            )
        if closed:
            state = ConversationState.CLOSED
            allowed: frozenset[type[Message]] = frozenset()
        else:
            state = self._phase
            allowed = _ALLOWED[sender][state]
        if type(msg) not in allowed:
            raise ProtocolError(
                "unexpected-message",
                f"unexpected {msg.TYPE!r} from {sender.value} in state {state.name}",
            )
        if isinstance(msg, Ping | Pong) and (self.version or 0) < PING_VERSION:
            raise ProtocolError(
                "unexpected-message",
                f"unexpected {msg.TYPE!r} from {sender.value}: it needs protocol version "
                f"{PING_VERSION}, this conversation negotiated {self.version}",
            )

    def _apply(self, msg: Message, sender: Role) -> None:
        if isinstance(msg, Hello):
            self.hello = msg
            self._phase = ConversationState.AWAIT_WELCOME
        elif isinstance(msg, Welcome):
            offered = self.hello.versions if self.hello is not None else ()
            if msg.version not in offered:
                raise ProtocolError(
                    "no-common-version",
                    f"welcome chose protocol version {msg.version}, "
                    f"but hello offered {list(offered)}",
                    "version",
                )
            asked = {s.name for s in self.hello.services} if self.hello is not None else set()
            if unasked := sorted({a.name for a in msg.services} - asked):
                raise ProtocolError(
                    "bad-field",
                    f"welcome addresses services the hello did not announce: {unasked}",
                    "services",
                )
            self.welcome = msg
            self.version = msg.version
            self._phase = ConversationState.AWAIT_READY
        elif isinstance(msg, Ready):
            self._phase = ConversationState.ESTABLISHED
        elif isinstance(msg, Ping) and sender is not self.role and not self._we_closed:
            self._outgoing += self.send(Pong(nonce=msg.nonce))
        elif isinstance(msg, Bye) or (isinstance(msg, Error) and msg.fatal):
            if sender is self.role:
                self._we_closed = True
            else:
                self._they_closed = True
