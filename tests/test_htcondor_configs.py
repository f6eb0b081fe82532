"""configs/htcondor/scheduler.sub parses with the real HTCondor submit language (htcondor2)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2")

SUB = Path(__file__).resolve().parent.parent / "configs" / "htcondor" / "scheduler.sub"


@pytest.fixture(scope="module")
def submit() -> object:
    return htcondor2.Submit(SUB.read_text())


def environment(submit: object) -> dict[str, str]:
    # The "new" environment syntax: a double-quoted, space-separated list of NAME=VALUE.
    raw = submit.expand("environment")  # type: ignore[attr-defined]
    assert raw.startswith('"')
    assert raw.endswith('"')
    return dict(item.split("=", 1) for item in shlex.split(raw[1:-1]))


def test_runs_the_agent_in_a_container(submit: object) -> None:
    sub = dict(submit)  # type: ignore[call-overload]
    assert sub["universe"] == "container"
    assert submit.expand("container_image").startswith("docker://")  # type: ignore[attr-defined]
    assert sub["executable"].endswith("/jobtunnel-agent")
    assert sub["transfer_executable"] == "false"
    args = shlex.split(sub["arguments"].strip('"'))
    assert args[:3] == ["--", "dask", "scheduler"]
    assert submit.getQArgs() == "1"  # type: ignore[attr-defined]


def test_token_is_a_transferred_file_not_in_the_ad(submit: object) -> None:
    env = environment(submit)
    token_file = env["JOBTUNNEL_TOKEN_FILE"]
    sub = dict(submit)  # type: ignore[call-overload]
    assert token_file in sub["transfer_input_files"].split(",")
    assert "JUPYTERHUB_API_TOKEN" not in env
    assert "token" not in sub["arguments"].lower()


def test_environment_names_the_agent_reads(submit: object) -> None:
    env = environment(submit)
    assert set(env) == {
        "JOBTUNNEL_FORWARDER",
        "JOBTUNNEL_USER",
        "JOBTUNNEL_TOKEN_FILE",
        "JOBTUNNEL_HOST_KEY_FINGERPRINT",
        "JOBTUNNEL_SERVICES",
    }
    assert env["JOBTUNNEL_SERVICES"] == "scheduler=8786,dashboard=8787"
    host, _, port = env["JOBTUNNEL_FORWARDER"].rpartition(":")
    assert host
    assert port.isdigit()


def test_asks_for_a_long_wall_time(submit: object) -> None:
    sub = dict(submit)  # type: ignore[call-overload]
    assert int(sub["MY.MaxWallTimeMins"]) > 60
