"""A daemon's output is its own: a noisy dependency release cannot change what it prints.

The test writes a stand-in for such a release: a module that warns at import time,
over two lines, in cryptography's own ``CryptographyDeprecationWarning`` (what
cryptography 51 did under ``import asyncssh``), then hands over to the real asyncssh.
It goes first on ``PYTHONPATH``, so every daemon imports it before anything else of
asyncssh. With it, a bad setting is still exactly one stderr line, and a running
forwarder logs the warning as one JSON event naming its category and module.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import structlog

from shared import hostkeys, logs, warnlog
from tests.harness import base_env, free_port, http_get, process, wait_for_sync, write_token_file

BIN = Path(sys.executable).parent
WARNING_TEXT = "noisy release: this algorithm is deprecated"
CATEGORY = "cryptography.utils.CryptographyDeprecationWarning"

NOISY_RELEASE = f"""
import warnings
from cryptography.utils import CryptographyDeprecationWarning
warnings.warn(
    "{WARNING_TEXT}\\nand says so on a second line", CryptographyDeprecationWarning, stacklevel=1
)
"""
# The stand-in asyncssh: warn through noisy_release, then become the real package.
STAND_IN = """
import importlib, os, sys
import noisy_release
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
del sys.modules["asyncssh"]
sys.modules["asyncssh"] = importlib.import_module("asyncssh")
"""


@pytest.fixture
def noisy_env(tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "noisy"
    (root / "asyncssh").mkdir(parents=True)
    (root / "noisy_release.py").write_text(NOISY_RELEASE)
    (root / "asyncssh" / "__init__.py").write_text(STAND_IN)
    return base_env() | {"PYTHONPATH": str(root)}


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_stand_in_really_is_noisy(noisy_env: dict[str, str], tmp_path: Path) -> None:
    # Without a daemon's entry point, Python prints the warning raw: what the daemons must hide.
    result = run(
        [sys.executable, "-c", "import asyncssh; asyncssh.SSHClientConnection"], noisy_env, tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert WARNING_TEXT in result.stderr
    assert "CryptographyDeprecationWarning" in result.stderr
    assert len(result.stderr.splitlines()) >= 2


@pytest.mark.parametrize(
    ("daemon", "argv_tail"),
    [
        ("jobtunnel-agent", ["--", "true"]),
        ("jobtunnel-forwarder", []),
        ("jobtunnel-reconciler", []),
    ],
)
def test_bad_setting_is_one_line_whatever_dependencies_print(
    noisy_env: dict[str, str], tmp_path: Path, daemon: str, argv_tail: list[str]
) -> None:
    env = noisy_env | {"JOBTUNNEL_LOG_LEVEL": "loud"}
    result = run([str(BIN / daemon), *argv_tail], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{daemon}: configuration error:"), line


def test_running_daemon_logs_warnings_as_json_events(
    noisy_env: dict[str, str], tmp_path: Path
) -> None:
    key = tmp_path / "host_key"
    hostkeys.load_or_generate(key)
    http = f"127.0.0.1:{free_port()}"
    env = noisy_env | {
        "JOBTUNNEL_LISTEN": "127.0.0.1:0",
        "JOBTUNNEL_HTTP": http,
        "JOBTUNNEL_ADMIN_HTTP": "127.0.0.1:0",
        "JOBTUNNEL_HOST_KEY": str(key),
        "JOBTUNNEL_TOKEN_FILE": str(write_token_file(tmp_path / "tokens", {"alice": "t" * 32})),
        "JOBTUNNEL_PORT_RANGE": "30000-30099",
    }
    log = tmp_path / "forwarder.log"
    with process([str(BIN / "jobtunnel-forwarder")], log, env) as fw:

        def ready_or_gone() -> bool:
            if fw.proc.poll() is not None:
                return True
            try:
                return http_get(f"http://{http}/readyz")[0] == 200
            except OSError:  # not listening yet
                return False

        wait_for_sync(ready_or_gone, what="the forwarder to be ready")
        assert fw.proc.poll() is None, fw.log()
    lines = log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line JSON: nothing raw
    warned = [e for e in events if e["event"] == "python warning"]
    ours = [e for e in warned if WARNING_TEXT in e["message"]]
    assert len(ours) == 1, lines
    assert ours[0]["category"] == CATEGORY
    assert ours[0]["module"] == "noisy_release"
    assert ours[0]["level"] == "warning"
    assert "second line" in ours[0]["message"]


def test_held_warnings_are_bounded_then_all_logged() -> None:
    stream = io.StringIO()
    with warnings.catch_warnings():  # restores Python's own showwarning afterwards
        warnings.simplefilter("always")
        warnlog.hold()
        for i in range(warnlog.HOLD_LIMIT + 5):
            warnings.warn(f"early {i}", UserWarning, stacklevel=1)
        assert len(warnlog.held()) == warnlog.HOLD_LIMIT
        logs.configure(json=True, stream=stream)
        try:
            warnlog.release(logs.get_logger("py.warnings"))
            warnings.warn("after logging started", RuntimeWarning, stacklevel=1)
        finally:
            structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    messages = [e["message"] for e in events if e["event"] == "python warning"]
    assert messages == [f"early {i}" for i in range(warnlog.HOLD_LIMIT)] + ["after logging started"]
    (dropped,) = [e for e in events if e["event"] != "python warning"]
    assert dropped["count"] == 5
    assert events[-1]["category"] == "builtins.RuntimeWarning"
    assert events[-1]["module"] == __name__
    assert warnlog.held() == []


@pytest.mark.parametrize("listener", ["JOBTUNNEL_LISTEN", "JOBTUNNEL_HTTP", "JOBTUNNEL_ADMIN_HTTP"])
def test_a_taken_port_stops_the_forwarder_with_one_log_line(tmp_path: Path, listener: str) -> None:
    key = tmp_path / "host_key"
    hostkeys.load_or_generate(key)
    env = base_env() | {
        "JOBTUNNEL_LISTEN": "127.0.0.1:0",
        "JOBTUNNEL_HTTP": "127.0.0.1:0",
        "JOBTUNNEL_ADMIN_HTTP": "127.0.0.1:0",
        "JOBTUNNEL_HOST_KEY": str(key),
        "JOBTUNNEL_TOKEN_FILE": str(write_token_file(tmp_path / "tokens", {"alice": "t" * 32})),
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env[listener] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run([str(BIN / "jobtunnel-forwarder")], env, tmp_path)
    assert result.returncode == 1, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]  # no traceback
    (error,) = [e for e in events if e["level"] == "error"]
    assert error["event"] == "stopped: cannot listen"
    assert env[listener] in error["error"]
    assert "in use" in error["error"]
