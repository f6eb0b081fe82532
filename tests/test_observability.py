"""Logs never show secrets; metrics pass Prometheus' own linter; health endpoints answer."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog

from daemons.forwarder.sessions import MemoryPublisher
from daemons.forwarder.settings import ForwarderSettings
from shared import logs
from shared.config import HostPort
from tests.harness import (
    agent_settings,
    forwarder_settings,
    http_get,
    running_agent,
    running_forwarder,
    write_token_file,
)
from tests.test_tunnel import TOKENS, echo_server

SECRET = "s3cr3t-token-value-0123456789"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(level="debug", json=True, secrets=[SECRET], stream=stream)
    yield stream
    structlog.reset_defaults()


def test_secrets_redacted_whatever_key_they_hide_under(json_logs: io.StringIO) -> None:
    log = logs.get_logger("test")
    log.info("by key", token=SECRET, password="hunter22-long", api_key="k" * 20)
    log.info("by value", detail=f"user alice sent {SECRET} in a body", nested={"x": [SECRET]})
    log.info("header", request="GET /hub/api/user Authorization: token abcdefghijklmnop")
    try:
        raise ValueError(f"bad thing with {SECRET}")
    except ValueError:
        log.exception("exception text")
    err = json_logs.getvalue()
    assert SECRET not in err
    assert "hunter22-long" not in err
    assert "abcdefghijklmnop" not in err
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["by key", "by value", "header", "exception text"]
    assert events[0]["token"] == logs.REDACTED
    assert events[1]["nested"] == {"x": [logs.REDACTED]}
    assert "bad thing with [redacted]" in str(events[3]["exception"])


def test_json_off_a_terminal(json_logs: io.StringIO) -> None:
    logs.get_logger("test").warning("hello", user="alice")
    (event,) = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    assert event["level"] == "warning"
    assert event["user"] == "alice"
    assert "timestamp" in event


@pytest.mark.anyio
async def test_metrics_pass_promtool_and_health_endpoints(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/setup installs Debian's prometheus package"
    write_token_file(tmp_path / "tokens", TOKENS)
    async with (
        echo_server() as port,
        running_forwarder(forwarder_settings(tmp_path)) as fw,
        running_agent(agent_settings(fw, services=(("scheduler", port),))),
    ):
        status, body = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/metrics")
        assert status == 200
        text = body.decode()
        assert 'jobtunnel_forwarder_sessions{state="published"} 1.0' in text
        assert "jobtunnel_auth_attempts_total" in text
        lint = await anyio.run_process([promtool, "check", "metrics"], input=body, check=False)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
        assert (await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/healthz"))[0] == 200
        assert (await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/readyz"))[0] == 200
        fw.forwarder.draining = True
        status, body = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/readyz")
        assert status == 503
        assert b"draining" in body
        fw.forwarder.draining = False


@pytest.mark.anyio
async def test_tunnels_only_on_the_loopback_admin_address_and_only_standalone(
    tmp_path: Path,
) -> None:
    assert ForwarderSettings.__dataclass_fields__["admin_http"].default == HostPort(
        "127.0.0.1", 8081
    )
    write_token_file(tmp_path / "tokens", {"alice": "alice-token-0123456789"})
    async with running_forwarder(forwarder_settings(tmp_path)) as fw:
        assert fw.admin is not None
        status, body = await anyio.to_thread.run_sync(http_get, f"http://{fw.admin}/tunnels")
        assert (status, json.loads(body)) == (200, [])
        # Not beside the metrics, which the cluster scrapes.
        status, _ = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/tunnels")
        assert status == 404
    kube_mode = forwarder_settings(
        tmp_path,
        publish="kubernetes",
        namespace="jobtunnel",
        pod_name="forwarder-0",
        pod_ip="127.0.0.1",
    )
    # Kubernetes mode: the Tunnel objects are the interface; no /tunnels anywhere.
    async with running_forwarder(kube_mode, publisher=MemoryPublisher()) as fw:
        assert fw.admin is None
        status, _ = await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/tunnels")
        assert status == 404
        assert (await anyio.to_thread.run_sync(http_get, f"http://{fw.http}/readyz"))[0] == 200
