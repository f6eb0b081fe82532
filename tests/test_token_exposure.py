"""What the agent's child (the scheduler, and any code it runs) can learn of the job's token.

The attack this closes: code running in the job reads the token from the agent's
``/proc/<pid>/environ`` (unsetting a variable does not erase it there), from its own
environment, or from an inherited file descriptor, and logs in with it elsewhere.

The test runs the real agent console script with a real child, both under the same uid and
without any capability (``setpriv``), as a job's processes run. The child is the attacker: it
reports what it could read. A sibling started the same way, but by no agent, proves that the
child *could* read a dumpable same-uid process's environ, so the refusals seen are the
agent's doing and not the test's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import base_env, free_port

BIN = Path(sys.executable).parent
TOKEN = "job-token-0123456789abcdef-EXPOSED"
NO_CAPS = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]

ATTACKER = textwrap.dedent(
    """
    import json, os, sys
    report, sibling = sys.argv[1], int(sys.argv[2])
    def read(path):
        try:
            with open(path, "rb") as f:
                return f.read(1 << 20).decode(errors="replace")
        except OSError as exc:
            return f"refused: {type(exc).__name__}"
    agent = os.getppid()
    open_fds = []
    for fd in range(3, 1024):
        try:
            os.fstat(fd)
            open_fds.append(fd)
        except OSError:
            pass
    with open(report, "w") as f:
        json.dump({
            "agent_environ": read(f"/proc/{agent}/environ"),
            "agent_memory": read(f"/proc/{agent}/mem"),
            "agent_cmdline": read(f"/proc/{agent}/cmdline"),
            "sibling_environ": read(f"/proc/{sibling}/environ"),
            "own_environ": dict(os.environ),
            "open_fds": open_fds,
        }, f)
    """
)


@pytest.fixture
def no_caps() -> list[str]:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to run the job's processes without caps")
    return NO_CAPS


@pytest.mark.parametrize("source", ["environment", "file"])
def test_the_child_cannot_read_the_token(no_caps: list[str], tmp_path: Path, source: str) -> None:
    attacker = tmp_path / "attacker.py"
    attacker.write_text(ATTACKER)
    report = tmp_path / "report.json"
    env = base_env() | {
        "JOBTUNNEL_FORWARDER": "127.0.0.1:1",  # never reached: the child exits first
        "JOBTUNNEL_USER": "alice",
        "JOBTUNNEL_HOST_KEY_FINGERPRINT": "SHA256:" + "A" * 43,
        "JOBTUNNEL_SERVICES": f"scheduler={free_port()}",
        "JOBTUNNEL_SERVICE_WAIT_TIMEOUT": "60",
    }
    if source == "environment":
        env["JUPYTERHUB_API_TOKEN"] = TOKEN
    else:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o400)
        env["JOBTUNNEL_TOKEN_FILE"] = str(token_file)
    sibling = subprocess.Popen(  # a same-uid, dumpable process with a secret in its environ
        [*no_caps, sys.executable, "-c", "import time; time.sleep(120)"],
        env=base_env() | {"SIBLING_MARK": TOKEN},
    )
    try:
        agent = subprocess.run(
            [
                *no_caps,
                str(BIN / "jobtunnel-agent"),
                "--",
                sys.executable,
                str(attacker),
                str(report),
                str(sibling.pid),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        sibling.kill()
        sibling.wait()
    assert agent.returncode == 0, agent.stderr[-3000:]
    seen = json.loads(report.read_text())
    # The control: without the agent's protection, same-uid environ reads work.
    assert f"SIBLING_MARK={TOKEN}" in seen["sibling_environ"], seen["sibling_environ"][:200]
    # The agent's own environ and memory are closed to the child.
    assert seen["agent_environ"] == "refused: PermissionError", seen["agent_environ"][:200]
    assert seen["agent_memory"] == "refused: PermissionError"
    assert TOKEN not in seen["agent_cmdline"]
    # Nothing of the token, or of the way to it, in the child's environment or descriptors.
    assert "JUPYTERHUB_API_TOKEN" not in seen["own_environ"]
    assert "JOBTUNNEL_TOKEN_FILE" not in seen["own_environ"]
    assert TOKEN not in json.dumps(seen["own_environ"])
    assert seen["open_fds"] == []
    # And the agent says it is guarded.
    starting = [
        json.loads(line)
        for line in agent.stderr.splitlines()
        if line.startswith("{") and '"starting"' in line
    ]
    assert starting, agent.stderr[-2000:]
    assert starting[0]["undumpable"] is True
    assert TOKEN not in agent.stderr + agent.stdout
