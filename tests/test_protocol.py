"""Tests for the sans-IO control-channel protocol (shared/protocol.py)."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.protocol import (
    HOST_RE,
    MAX_FRAME_SIZE,
    MAX_NAME_LENGTH,
    MAX_SERVICES,
    MAX_TEXT_LENGTH,
    NONCE_RE,
    PROTOCOL_VERSIONS,
    AgentCounters,
    Bye,
    Conversation,
    ConversationState,
    Drain,
    Error,
    FrameDecoder,
    Heartbeat,
    HeartbeatAck,
    Hello,
    JobInfo,
    Message,
    Ping,
    PodInfo,
    Pong,
    ProtocolError,
    Ready,
    Role,
    ServiceAddress,
    ServiceSpec,
    ServiceStatus,
    Welcome,
    encode,
    from_dict,
    negotiate,
    to_dict,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies -----------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True)
text = st.text(max_size=40)
counts = st.integers(0, 2**63 - 1)
numbers = st.floats(allow_nan=False, allow_infinity=False)
ports = st.integers(1, 65535)

jobs = st.builds(JobInfo, global_job_id=text, cluster_id=counts, proc_id=counts, schedd=text)
pods = st.builds(PodInfo, namespace=text, name=text, uid=text)
service_specs = st.builds(ServiceSpec, name=names, port=ports)
hosts = st.from_regex(HOST_RE, fullmatch=True).filter(lambda h: len(h) <= 253)
service_addresses = st.builds(ServiceAddress, name=names, host=hosts, port=ports)
counters = st.builds(
    AgentCounters,
    connections=counts,
    bytes_in=counts,
    bytes_out=counts,
    services_up=st.dictionaries(names, st.booleans(), max_size=4),
)

hellos = st.builds(
    Hello,
    versions=st.lists(st.integers(1, 2**31 - 1), min_size=1, max_size=4).map(tuple),
    agent_version=text,
    instance_id=text,
    job=st.none() | jobs,
    pod=st.none() | pods,
    private_ip=st.none() | st.ip_addresses().map(str),
    services=st.lists(service_specs, max_size=4, unique_by=lambda s: s.name).map(tuple),
)
welcomes = st.builds(
    Welcome,
    version=st.integers(1, 2**31 - 1),
    session_id=text,
    heartbeat_interval=st.floats(min_value=0.1, max_value=3600),
    services=st.lists(service_addresses, max_size=4, unique_by=lambda s: s.name).map(tuple),
)
readies = st.builds(Ready, services=st.lists(names, max_size=4, unique=True).map(tuple))
heartbeats = st.builds(Heartbeat, seq=counts, sent_at=numbers, counters=counters)
acks = st.builds(HeartbeatAck, seq=counts, sent_at=numbers, received_at=numbers)
statuses = st.builds(ServiceStatus, name=names, up=st.booleans(), detail=text)
drains = st.builds(Drain, reason=text, retry_after=st.floats(min_value=0, max_value=1e9))
byes = st.builds(Bye, reason=text, exit_code=st.none() | st.integers(-(2**31), 2**31 - 1))
errors = st.builds(Error, code=text, message=text, fatal=st.booleans())
nonces = st.from_regex(NONCE_RE, fullmatch=True)
pings = st.builds(Ping, nonce=nonces)
pongs = st.builds(Pong, nonce=nonces)

messages: st.SearchStrategy[Message] = st.one_of(
    hellos, welcomes, readies, heartbeats, acks, statuses, drains, pings, pongs, byes, errors
)

json_scalars = st.none() | st.booleans() | st.integers() | numbers | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def frame_json(obj: object) -> bytes:
    return frame(json.dumps(obj).encode())


def decode_one(obj: object) -> Message:
    [msg] = FrameDecoder().feed(frame_json(obj))
    return msg


def raises(code: str, obj: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        from_dict(obj)
    assert info.value.code == code, str(info.value)
    return info.value


HELLO = Hello(
    versions=(1,),
    agent_version="0.1.0",
    instance_id="inst-1",
    job=JobInfo(global_job_id="schedd#1.0#1", cluster_id=1, proc_id=0, schedd="schedd"),
    pod=PodInfo(namespace="ns", name="pod", uid="uid-1"),
    private_ip="10.1.2.3",
    services=(ServiceSpec(name="scheduler", port=8786), ServiceSpec(name="dashboard", port=8787)),
)
WELCOME = Welcome(
    version=1,
    session_id="sess",
    heartbeat_interval=10,
    services=(ServiceAddress(name="scheduler", host="svc.ns", port=8786),),
)


# --- round trips ----------------------------------------------------------------------------


@MEDIUM
@given(messages)
def test_roundtrip_dict_and_frame(msg: Message) -> None:
    assert from_dict(to_dict(msg)) == msg
    assert from_dict(json.loads(json.dumps(to_dict(msg)))) == msg
    data = encode(msg)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert FrameDecoder().feed(data) == [msg]


@FAST
@given(st.lists(messages, max_size=6), st.data())
def test_stream_split_anywhere(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    out: list[Message] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert out == msgs
    assert decoder.buffered == 0


def test_one_byte_at_a_time() -> None:
    stream = encode(HELLO) + encode(WELCOME) + encode(Ready())
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        assert decoder.buffered <= i + 1
    assert out == [HELLO, WELCOME, Ready()]
    assert decoder.buffered == 0


def test_to_dict_omits_none_and_is_compact() -> None:
    msg = Bye(reason="done")
    assert to_dict(msg) == {"type": "bye", "reason": "done"}
    assert encode(msg) == frame(b'{"type":"bye","reason":"done"}')
    assert to_dict(Heartbeat(seq=1, sent_at=2)) == {
        "type": "heartbeat",
        "seq": 1,
        "sent_at": 2.0,
        "counters": {"connections": 0, "bytes_in": 0, "bytes_out": 0, "services_up": {}},
    }


def test_non_ascii_is_sent_as_utf8() -> None:
    data = encode(Error(code="x", message="héllo ☃"))
    assert "héllo ☃".encode() in data
    assert FrameDecoder().feed(data) == [Error(code="x", message="héllo ☃")]


def test_int_accepted_for_float_fields() -> None:
    msg = decode_one({"type": "heartbeat_ack", "seq": 1, "sent_at": 5, "received_at": 6})
    assert msg == HeartbeatAck(seq=1, sent_at=5.0, received_at=6.0)
    assert isinstance(msg, HeartbeatAck)
    assert isinstance(msg.sent_at, float)


def test_explicit_null_means_absent() -> None:
    assert from_dict({"type": "bye", "reason": "r", "exit_code": None}) == Bye(reason="r")


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        HELLO.agent_version = "x"  # type: ignore[misc]


# --- robustness: only ProtocolError, ever ---------------------------------------------------


@MEDIUM
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder()
    with contextlib.suppress(ProtocolError):
        decoder.feed(data)


@MEDIUM
@given(st.binary(max_size=200))
def test_arbitrary_framed_payload_only_raises_protocol_error(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        FrameDecoder().feed(frame(payload))


@MEDIUM
@given(json_values)
def test_arbitrary_json_only_raises_protocol_error(obj: Any) -> None:
    with contextlib.suppress(ProtocolError):
        from_dict(obj)
    with contextlib.suppress(ProtocolError):
        FrameDecoder().feed(frame_json(obj))


def _mutate(obj: Any, data: st.DataObject) -> Any:
    """Replace one randomly chosen value (at any depth) with arbitrary JSON."""
    if isinstance(obj, dict) and obj and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(obj)))
        return {**obj, key: _mutate(obj[key], data)}
    if isinstance(obj, list) and obj and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(obj) - 1))
        return [*obj[:i], _mutate(obj[i], data), *obj[i + 1 :]]
    return data.draw(json_values)


@MEDIUM
@given(messages, st.data())
def test_mutated_messages_only_raise_protocol_error(msg: Message, data: st.DataObject) -> None:
    obj = _mutate(to_dict(msg), data)
    if isinstance(obj, dict) and data.draw(st.booleans()):
        obj = {**obj, data.draw(st.text(max_size=8)): data.draw(json_values)}
    error: ProtocolError | None = None
    try:
        result = from_dict(obj)
    except ProtocolError as err:
        error = err
    if error is None:
        assert from_dict(to_dict(result)) == result
    else:
        assert error.code
        assert "\n" not in str(error)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,
        b"[" * 60_000 + b"]" * 60_000,
        b'{"type":"hello","versions":[' + b"9" * 5000 + b"]}",
        b"\xef\xbb\xbf{}",
        b"",
        b"NaN",
        b'{"type":"heartbeat","seq":1,"sent_at":1e999}',
    ],
    ids=["deep", "deep-closed", "huge-int", "bom", "empty", "nan", "overflow-float"],
)
def test_nasty_payloads(payload: bytes) -> None:
    payload = payload[:MAX_FRAME_SIZE]
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(frame(payload))


# --- precise errors -------------------------------------------------------------------------


def test_oversize_header_rejected_before_body() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">I", MAX_FRAME_SIZE + 1)[:3]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(struct.pack(">I", MAX_FRAME_SIZE + 1)[3:])
    assert info.value.code == "frame-too-large"
    assert str(MAX_FRAME_SIZE + 1) in str(info.value)


def test_max_size_frame_is_accepted() -> None:
    # No valid message is that large any more (strings are bounded): pad with JSON whitespace.
    msg = Error(code="c", message="x" * MAX_TEXT_LENGTH)
    body = json.dumps(to_dict(msg), separators=(",", ":")).encode()
    data = frame(body + b" " * (MAX_FRAME_SIZE - len(body)))
    assert len(data) == 4 + MAX_FRAME_SIZE
    assert FrameDecoder().feed(data) == [msg]
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(body + b" " * (MAX_FRAME_SIZE - len(body) + 1)))
    assert info.value.code == "frame-too-large"
    with pytest.raises(ProtocolError) as info:
        Error(code="c", message="x" * (MAX_TEXT_LENGTH + 1))
    assert info.value.code == "bad-field"
    assert f"over {MAX_TEXT_LENGTH}" in str(info.value)


def test_bounds_on_services_and_names() -> None:
    many = [{"name": f"s{i}", "port": 1} for i in range(MAX_SERVICES + 1)]
    obj = {"type": "hello", "versions": [1], "agent_version": "a", "instance_id": "i"}
    err = raises("bad-field", {**obj, "services": many})
    assert err.field == "services"
    assert str(err) == f"hello.services: array of {MAX_SERVICES + 1} items, over {MAX_SERVICES}"
    up = {f"s{i}": True for i in range(3800)}
    hb = {"type": "heartbeat", "seq": 1, "sent_at": 1.0, "counters": {"services_up": up}}
    assert raises("bad-field", hb).field == "counters.services_up"
    long_id = {**obj, "instance_id": "i" * (MAX_NAME_LENGTH + 1)}
    assert raises("bad-field", long_id).field == "instance_id"
    # Port 0 in a welcome: chosen when the forward is requested.
    assert ServiceAddress(name="scheduler", host="h", port=0).port == 0


def test_decoder_stays_closed_after_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(frame(b"not json"))
    assert first.value.code == "bad-json"
    with pytest.raises(ProtocolError) as again:
        decoder.feed(encode(Ready()))
    assert again.value.code == "bad-json"


def test_messages_before_error_are_kept_on_the_exception() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(encode(Bye(reason="done")) + frame(b"{"))
    assert info.value.decoded == (Bye(reason="done"),)


def test_bad_json() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(b'{"type": "ready",'))
    assert info.value.code == "bad-json"
    assert "line 1" in str(info.value)


def test_duplicate_keys_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(b'{"type":"bye","reason":"a","reason":"b"}'))
    assert info.value.code == "bad-json"
    assert "duplicate key 'reason'" in str(info.value)


@pytest.mark.parametrize("obj", [[], "hello", 1, None, True])
def test_not_an_object(obj: object) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_one(obj)
    assert info.value.code == "not-an-object"


def test_invalid_utf8() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(b'{"type":"bye","reason":"\xff"}'))
    assert info.value.code == "bad-utf8"


def test_lone_surrogate_escape_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame(b'{"type":"bye","reason":"\\ud800"}'))
    assert info.value.code == "bad-field"
    assert info.value.field == "reason"


def test_unknown_type() -> None:
    err = raises("unknown-type", {"type": "launch_missiles"})
    assert err.field == "type"
    assert "'launch_missiles'" in str(err)


def test_missing_or_bad_type() -> None:
    assert raises("missing-field", {"reason": "x"}).field == "type"
    assert raises("bad-field", {"type": 3}).field == "type"


def test_unknown_field() -> None:
    err = raises("unknown-field", {"type": "bye", "reason": "x", "extra": 1})
    assert err.field == "extra"
    assert str(err) == "bye.extra: unknown field"
    obj = to_dict(HELLO)
    obj["job"] = {**obj["job"], "type": "x"}  # type: ignore[dict-item]
    assert raises("unknown-field", obj).field == "job.type"
    err = raises("unknown-field", {"type": "bye", "reason": "x", "a\nb": 1})
    assert err.field == "['a\\nb']"
    assert str(err) == "bye['a\\nb']: unknown field"


def test_wrong_type_names_dotted_field() -> None:
    obj = to_dict(HELLO)
    obj["services"] = [{"name": "scheduler", "port": 8786}, {"name": "dashboard", "port": "abc"}]
    err = raises("bad-field", obj)
    assert err.field == "services[1].port"
    assert str(err) == "hello.services[1].port: expected an int in 1..65535, got 'abc'"


def test_wrong_nested_type() -> None:
    obj = to_dict(Heartbeat(seq=1, sent_at=1.0))
    obj["counters"] = {"services_up": {"scheduler": "yes"}}
    err = raises("bad-field", obj)
    assert err.field == "counters.services_up['scheduler']"
    obj["counters"] = []
    assert raises("bad-field", obj).field == "counters"


def test_missing_field() -> None:
    err = raises("missing-field", {"type": "hello", "versions": [1], "agent_version": "x"})
    assert err.field == "instance_id"
    assert str(err) == "hello.instance_id: missing required field"
    obj = to_dict(HELLO)
    obj["job"] = {"global_job_id": "g", "cluster_id": 1, "proc_id": 0}
    assert raises("missing-field", obj).field == "job.schedd"


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"type": "heartbeat", "seq": True, "sent_at": 1.0}, "seq"),
        ({"type": "heartbeat_ack", "seq": 1, "sent_at": False, "received_at": 1.0}, "sent_at"),
        ({"type": "bye", "reason": "x", "exit_code": True}, "exit_code"),
        ({"type": "hello", "versions": [True], "agent_version": "a", "instance_id": "i"}, None),
    ],
)
def test_bool_is_not_a_number(obj: dict[str, object], field: str | None) -> None:
    err = raises("bad-field", obj)
    assert err.field == (field or "versions[0]")
    assert "got True" in str(err) or "got False" in str(err)


def test_int_is_not_a_bool() -> None:
    assert raises("bad-field", {"type": "service", "name": "x", "up": 1}).field == "up"


@pytest.mark.parametrize("port", [0, 65536, -1, 1.5, "8786", None])
def test_port_out_of_range(port: object) -> None:
    obj = to_dict(HELLO)
    obj["services"] = [{"name": "scheduler", "port": port}]
    assert raises("bad-field", obj).field == "services[0].port"
    with pytest.raises(ProtocolError):
        ServiceSpec(name="scheduler", port=port)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "Scheduler", "1abc", "a_b", "a" * 32, "sched\n"])
def test_bad_service_name(name: str) -> None:
    with pytest.raises(ProtocolError) as info:
        ServiceSpec(name=name, port=1)
    assert info.value.code == "bad-field"
    assert info.value.field == "name"


@pytest.mark.parametrize("ip", ["10.0.0.256", "localhost", "", "1.2.3", "::g"])
def test_invalid_private_ip(ip: str) -> None:
    obj = to_dict(HELLO)
    obj["private_ip"] = ip
    err = raises("bad-field", obj)
    assert err.field == "private_ip"


@pytest.mark.parametrize("ip", ["10.0.0.1", "::1", "fd00::1:2"])
def test_valid_private_ip(ip: str) -> None:
    obj = to_dict(HELLO)
    obj["private_ip"] = ip
    assert isinstance(from_dict(obj), Hello)


def test_duplicate_service_names() -> None:
    obj = to_dict(HELLO)
    obj["services"] = [{"name": "a", "port": 1}, {"name": "b", "port": 2}, {"name": "a", "port": 3}]
    err = raises("bad-field", obj)
    assert err.field == "services[2].name"
    assert "duplicate service name 'a'" in str(err)
    with pytest.raises(ProtocolError):
        Ready(services=("a", "a"))


def test_empty_versions_rejected() -> None:
    with pytest.raises(ProtocolError) as info:
        Hello(versions=(), agent_version="a", instance_id="i")
    assert info.value.field == "versions"


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (Welcome, {"version": 1, "session_id": "s", "heartbeat_interval": 0}, "heartbeat_interval"),
        (Drain, {"reason": "r", "retry_after": -1}, "retry_after"),
        (Heartbeat, {"seq": -1, "sent_at": 0.0}, "seq"),
        (Heartbeat, {"seq": 0, "sent_at": float("nan")}, "sent_at"),
        (HeartbeatAck, {"seq": 0, "sent_at": 0.0, "received_at": float("inf")}, "received_at"),
        (Heartbeat, {"seq": 2**63, "sent_at": 0.0}, "seq"),
        (Heartbeat, {"seq": 0, "sent_at": 10**400}, "sent_at"),
    ],
)
def test_constructor_validates(cls: Any, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        cls(**kwargs)
    assert info.value.field == field


def test_constructor_normalises_lists_to_tuples() -> None:
    msg = Ready(services=["a", "b"])  # type: ignore[arg-type]
    assert msg.services == ("a", "b")


def test_as_error() -> None:
    err = raises("unknown-type", {"type": "nope"})
    assert err.as_error() == Error(code="unknown-type", message=str(err), fatal=True)


# --- version negotiation --------------------------------------------------------------------


def test_negotiate_picks_highest_common() -> None:
    assert negotiate([1, 2, 3], [2, 3, 4]) == 3
    assert negotiate(iter([1]), iter([1])) == 1
    assert negotiate([1]) == 1
    assert negotiate([5, 1]) == 1  # 5 is unknown to us: the highest we share
    assert negotiate([5, *PROTOCOL_VERSIONS]) == max(PROTOCOL_VERSIONS)


def test_negotiate_no_common_version() -> None:
    with pytest.raises(ProtocolError) as info:
        negotiate([2, 3], [1])
    assert info.value.code == "no-common-version"
    assert "[2, 3]" in str(info.value)
    with pytest.raises(ProtocolError):
        negotiate([], [1])


# --- conversation ---------------------------------------------------------------------------


def pair() -> tuple[Conversation, Conversation]:
    return Conversation(Role.AGENT), Conversation(Role.FORWARDER)


def deliver(sender: Conversation, receiver: Conversation, msg: Message) -> None:
    assert receiver.receive_data(sender.send(msg)) == [msg]


def established() -> tuple[Conversation, Conversation]:
    agent, fwd = pair()
    deliver(agent, fwd, HELLO)
    deliver(fwd, agent, WELCOME)
    deliver(agent, fwd, Ready(services=("scheduler",)))
    return agent, fwd


def unexpected(conv: Conversation, data: bytes, code: str = "unexpected-message") -> str:
    with pytest.raises(ProtocolError) as info:
        conv.receive_data(data)
    assert info.value.code == code, str(info.value)
    return str(info.value)


def assert_state(state: ConversationState, *convs: Conversation) -> None:
    # A helper rather than inline asserts: mypy would narrow `conv.state` across steps.
    assert [conv.state for conv in convs] == [state] * len(convs)


def test_happy_path_both_roles() -> None:
    agent, fwd = pair()
    assert_state(ConversationState.AWAIT_HELLO, agent, fwd)
    deliver(agent, fwd, HELLO)
    assert_state(ConversationState.AWAIT_WELCOME, agent, fwd)
    assert fwd.hello == HELLO
    deliver(fwd, agent, WELCOME)
    assert_state(ConversationState.AWAIT_READY, agent, fwd)
    assert agent.version == fwd.version == 1
    deliver(agent, fwd, Heartbeat(seq=0, sent_at=1.0))  # allowed while registering forwards
    deliver(fwd, agent, HeartbeatAck(seq=0, sent_at=1.0, received_at=1.5))
    deliver(agent, fwd, ServiceStatus(name="scheduler", up=True))
    deliver(agent, fwd, Ready(services=("scheduler", "dashboard")))
    assert_state(ConversationState.ESTABLISHED, agent, fwd)
    deliver(agent, fwd, Heartbeat(seq=1, sent_at=2.0))
    deliver(fwd, agent, HeartbeatAck(seq=1, sent_at=2.0, received_at=2.5))
    deliver(fwd, agent, Error(code="slow", message="warning only", fatal=False))
    deliver(fwd, agent, Drain(reason="shutdown", retry_after=1))
    assert_state(ConversationState.ESTABLISHED, agent, fwd)
    deliver(agent, fwd, Bye(reason="job done", exit_code=0))
    assert_state(ConversationState.CLOSED, agent, fwd)


def test_many_messages_in_one_chunk() -> None:
    agent, fwd = pair()
    deliver(agent, fwd, HELLO)
    deliver(fwd, agent, WELCOME)
    batch: list[Message] = [Ready(), Heartbeat(seq=0, sent_at=0.0), Bye(reason="x")]
    assert fwd.receive_data(b"".join(agent.send(m) for m in batch)) == batch


def test_hello_twice() -> None:
    agent, fwd = pair()
    data = agent.send(HELLO)
    fwd.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        agent.send(HELLO)
    assert info.value.code == "unexpected-message"
    assert "AWAIT_WELCOME" in unexpected(fwd, data)


def test_ready_before_welcome() -> None:
    agent, fwd = pair()
    fwd.receive_data(agent.send(HELLO))
    with pytest.raises(ProtocolError):
        agent.send(Ready())
    message = unexpected(fwd, encode(Ready()))
    assert message == "unexpected 'ready' from agent in state AWAIT_WELCOME"


def test_first_message_must_be_hello() -> None:
    _, fwd = pair()
    unexpected(fwd, encode(Heartbeat(seq=0, sent_at=0)))


def test_data_after_bye() -> None:
    agent, fwd = established()
    deliver(agent, fwd, Bye(reason="done"))
    with pytest.raises(ProtocolError):
        agent.send(Heartbeat(seq=9, sent_at=0))
    assert "CLOSED" in unexpected(fwd, encode(Heartbeat(seq=9, sent_at=0)))


def test_fatal_error_closes() -> None:
    agent, fwd = established()
    deliver(fwd, agent, Error(code="x", message="y"))
    assert_state(ConversationState.CLOSED, agent, fwd)
    unexpected(agent, encode(HeartbeatAck(seq=0, sent_at=0, received_at=0)))
    with pytest.raises(ProtocolError):
        agent.send(Heartbeat(seq=0, sent_at=0))


def test_peer_messages_in_flight_after_our_bye_are_accepted() -> None:
    agent, fwd = established()
    in_flight = fwd.send(HeartbeatAck(seq=0, sent_at=0, received_at=0))
    fwd.receive_data(agent.send(Bye(reason="done")))
    assert agent.state is ConversationState.CLOSED
    assert agent.receive_data(in_flight) == [HeartbeatAck(seq=0, sent_at=0, received_at=0)]


def test_welcome_with_unoffered_version() -> None:
    agent, fwd = pair()
    fwd.receive_data(agent.send(HELLO))
    bad = Welcome(version=7, session_id="s", heartbeat_interval=5)
    with pytest.raises(ProtocolError) as info:
        fwd.send(bad)
    assert info.value.code == "no-common-version"
    assert fwd.state is ConversationState.AWAIT_WELCOME
    unexpected(agent, encode(bad), code="no-common-version")
    assert agent.version is None


def test_wrong_direction() -> None:
    agent, fwd = established()
    assert "only the forwarder sends it" in unexpected(fwd, encode(Drain(reason="x")))
    agent2, _ = established()
    assert "only the agent sends it" in unexpected(agent2, encode(Heartbeat(seq=0, sent_at=0)))
    with pytest.raises(ProtocolError):
        agent.send(HeartbeatAck(seq=0, sent_at=0, received_at=0))


def test_forwarder_can_explain_after_peer_violation() -> None:
    _, fwd = pair()
    with pytest.raises(ProtocolError) as info:
        fwd.receive_data(frame(b"garbage"))
    assert fwd.state is ConversationState.CLOSED
    data = fwd.send(info.value.as_error())
    assert FrameDecoder().feed(data) == [info.value.as_error()]
    with pytest.raises(ProtocolError):
        fwd.send(Error(code="again", message="no"))  # only one fatal explanation
    again = unexpected(fwd, encode(HELLO), code="bad-json")
    assert "earlier error" in again


def test_forwarder_can_reject_hello_with_error() -> None:
    agent, fwd = pair()
    fwd.receive_data(agent.send(Hello(versions=(9,), agent_version="x", instance_id="i")))
    with pytest.raises(ProtocolError) as info:
        negotiate(fwd.hello.versions if fwd.hello else ())
    agent.receive_data(fwd.send(info.value.as_error()))
    assert_state(ConversationState.CLOSED, agent, fwd)


@FAST
@given(st.lists(messages, max_size=8))
def test_conversation_receive_only_raises_protocol_error(msgs: list[Message]) -> None:
    for role in Role:
        conv = Conversation(role)
        codes: list[str] = []
        try:
            conv.receive_data(b"".join(encode(m) for m in msgs))
        except ProtocolError as err:
            codes.append(err.code)
        assert set(codes) <= {"unexpected-message", "no-common-version"}
        if codes:
            assert conv.state is ConversationState.CLOSED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("heartbeat_interval", 0.01),  # a busy loop of heartbeats
        ("heartbeat_interval", 1e6),  # a session nobody could tell is dead
        ("services", [{"name": "scheduler", "host": "svc.ns\nFAKE LOG LINE", "port": 1}]),
        ("services", [{"name": "scheduler", "host": "a b", "port": 1}]),
    ],
)
def test_agent_refuses_welcome_values_out_of_bounds(field: str, value: object) -> None:
    agent, fwd = pair()
    fwd.receive_data(agent.send(HELLO))
    body = {"type": "welcome", "version": 1, "session_id": "s", "heartbeat_interval": 5.0}
    body[field] = value
    frame = struct.pack(">I", len(raw := json.dumps(body).encode())) + raw
    assert field in unexpected(agent, frame, code="bad-field")


def test_agent_refuses_addresses_for_services_it_did_not_announce() -> None:
    agent, fwd = pair()
    fwd.receive_data(agent.send(HELLO))
    extra = Welcome(
        version=1,
        session_id="s",
        heartbeat_interval=5,
        services=(ServiceAddress(name="jupyter", host="10.0.0.1", port=1),),
    )
    assert "['jupyter']" in unexpected(agent, encode(extra), code="bad-field")
    # Hosts as forwarders really advertise them pass: names, IPv4 and IPv6 literals.
    for host in ("svc.ns", "10.0.0.12", "fd00::1", "forwarder-0.jobtunnel.svc"):
        ok_agent, ok_fwd = pair()
        ok_fwd.receive_data(ok_agent.send(HELLO))
        ok = Welcome(
            version=1,
            session_id="s",
            heartbeat_interval=5,
            services=(ServiceAddress(name="scheduler", host=host, port=40000),),
        )
        assert ok_agent.receive_data(ok_fwd.send(ok)) == [ok]


# --- liveness challenge (version 2) ---------------------------------------------------------

HELLO_V2 = Hello(versions=(1, 2), agent_version="0.2.0", instance_id="inst-2")
WELCOME_V2 = Welcome(version=2, session_id="sess", heartbeat_interval=10)


def established_v2() -> tuple[Conversation, Conversation]:
    agent, fwd = pair()
    deliver(agent, fwd, HELLO_V2)
    deliver(fwd, agent, WELCOME_V2)
    deliver(agent, fwd, Ready())
    return agent, fwd


def test_version_2_is_offered_and_negotiated() -> None:
    assert PROTOCOL_VERSIONS == (1, 2)
    assert negotiate(PROTOCOL_VERSIONS) == 2
    assert negotiate([1]) == 1  # an old agent still gets in, without ping/pong


@pytest.mark.parametrize("cls", [Ping, Pong])
def test_ping_pong_round_trip(cls: type[Ping] | type[Pong]) -> None:
    msg = cls(nonce="n0nce-_AZ09")
    assert to_dict(msg) == {"type": cls.TYPE, "nonce": "n0nce-_AZ09"}
    assert from_dict(to_dict(msg)) == msg
    assert FrameDecoder().feed(encode(msg)) == [msg]


@pytest.mark.parametrize(
    "nonce",
    ["short", "x" * 65, "has space ok", "new\nline-nonce", 12345678, None, True, ["abcdefgh"]],
)
@pytest.mark.parametrize("type_name", ["ping", "pong"])
def test_bad_nonce_refused_naming_the_field(type_name: str, nonce: object) -> None:
    err = raises("bad-field", {"type": type_name, "nonce": nonce})
    assert err.field == "nonce"
    assert str(err).startswith(f"{type_name}.nonce: "), str(err)
    with pytest.raises(ProtocolError, match=rf"{type_name}\.nonce"):
        (Ping if type_name == "ping" else Pong)(nonce=nonce)  # type: ignore[arg-type]


def test_missing_nonce_refused() -> None:
    err = raises("missing-field", {"type": "ping"})
    assert err.field == "nonce"


def test_agent_conversation_answers_ping_by_itself() -> None:
    agent, fwd = established_v2()
    ping = Ping(nonce="abcdefgh12")
    assert agent.data_to_send() == b""
    assert agent.receive_data(fwd.send(ping)) == [ping]  # the daemon still sees it
    answer = agent.data_to_send()
    assert agent.data_to_send() == b""  # handed out once
    assert fwd.receive_data(answer) == [Pong(nonce="abcdefgh12")]
    assert_state(ConversationState.ESTABLISHED, agent, fwd)


def test_ping_answered_between_welcome_and_ready() -> None:
    agent, fwd = pair()
    deliver(agent, fwd, HELLO_V2)
    deliver(fwd, agent, WELCOME_V2)
    agent.receive_data(fwd.send(Ping(nonce="abcdefgh12")))
    assert fwd.receive_data(agent.data_to_send()) == [Pong(nonce="abcdefgh12")]
    assert_state(ConversationState.AWAIT_READY, agent, fwd)


def test_no_pong_after_our_bye() -> None:
    agent, fwd = established_v2()
    ping = fwd.send(Ping(nonce="abcdefgh12"))
    fwd.receive_data(agent.send(Bye(reason="done")))
    assert agent.receive_data(ping) == [Ping(nonce="abcdefgh12")]
    assert agent.data_to_send() == b""


@pytest.mark.parametrize("cls", [Ping, Pong])
def test_ping_pong_before_welcome_refused(cls: type[Ping] | type[Pong]) -> None:
    agent, fwd = pair()
    deliver(agent, fwd, HELLO_V2)  # AWAIT_WELCOME on both sides
    receiver = agent if cls is Ping else fwd
    message = unexpected(receiver, encode(cls(nonce="abcdefgh12")))
    assert "AWAIT_WELCOME" in message, message
    assert_state(ConversationState.CLOSED, receiver)
    fresh = Conversation(Role.FORWARDER)
    assert "AWAIT_HELLO" in unexpected(fresh, encode(Pong(nonce="abcdefgh12")))


def test_ping_pong_wrong_direction_refused() -> None:
    agent, fwd = established_v2()
    assert "only the forwarder" in unexpected(fwd, encode(Ping(nonce="abcdefgh12")))
    assert "only the agent" in unexpected(agent, encode(Pong(nonce="abcdefgh12")))
    with pytest.raises(ProtocolError, match="only the agent"):
        Conversation(Role.FORWARDER).send(Pong(nonce="abcdefgh12"))


def test_ping_pong_need_version_2() -> None:
    agent, fwd = established()  # version 1
    assert agent.version == 1
    assert "version 2" in unexpected(agent, encode(Ping(nonce="abcdefgh12")))
    _, fwd = established()
    assert "version 2" in unexpected(fwd, encode(Pong(nonce="abcdefgh12")))
    _, fwd = established()
    with pytest.raises(ProtocolError, match="version 2"):
        fwd.send(Ping(nonce="abcdefgh12"))
