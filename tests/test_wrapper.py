"""The job wrapper's own command line, run here without Singularity/Apptainer.

``configs/htcondor/scheduler.sub`` is parsed by the real ``htcondor2.Submit``;
its executable, arguments and environment are what this test runs, in a
scratch directory laid out the way HTCondor lays one out (the token file
transferred with mode 0600, ``$_CONDOR_JOB_AD`` pointing at a real job ad).
Only the container runtime is missing: the agent is the venv's console script.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import htcondor2
import pytest

from tests.harness import base_env, free_port, process
from tests.test_identity import REAL_JOB_AD
from tests.test_processes import (
    DEADLINE,
    TOKENS,
    Keys,
    _quiet,
    dask_sum_of_squares,
    forwarder,
    keys,  # noqa: F401 - fixture
    only_tunnel,
    wait_until,
)

SUBMIT = Path(__file__).resolve().parent.parent / "configs" / "htcondor" / "scheduler.sub"
AGENT = str(Path(sys.executable).parent / "jobtunnel-agent")


def _submit_environment(value: str) -> dict[str, str]:
    """HTCondor's "new" environment syntax: double-quoted, space-separated NAME=VALUE."""
    return dict(item.split("=", 1) for item in shlex.split(value.strip('"')))


@pytest.mark.slow
def test_wrapper_command_line_supervises_and_tunnels_a_real_scheduler(
    keys: Keys,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    with forwarder(keys, tmp_path / "forwarder.log") as fw:
        sub = htcondor2.Submit(SUBMIT.read_text())
        sub["forwarder"] = str(fw.ssh)
        sub["hub_user"] = "alice"
        sub["host_key_sha256"] = keys.fingerprint
        assert sub.expand("executable") == "/usr/local/bin/jobtunnel-agent"
        assert "jobtunnel-token" in sub.expand("transfer_input_files")
        arguments = shlex.split(sub.expand("arguments").strip('"'))
        environment = _submit_environment(sub.expand("environment"))
        assert TOKENS["alice"] not in sub.expand("environment")
        assert "JUPYTERHUB_API_TOKEN" not in environment, "the token travels as a 0600 file"

        # The scratch directory: token file (0600) and the job ad HTCondor writes.
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        token = scratch / environment["JOBTUNNEL_TOKEN_FILE"]
        token.write_text(TOKENS["alice"] + "\n")
        token.chmod(0o600)
        job_ad = scratch / ".job.ad"
        job_ad.write_text(REAL_JOB_AD)

        # The image's scheduler would listen on 8786/8787; here, free ports on loopback.
        sched, dash = free_port(), free_port()
        assert arguments[:3] == ["--", "dask", "scheduler"]
        command = [
            AGENT, "--", sys.executable, "-m", "distributed.cli.dask_scheduler",
            "--host", "127.0.0.1", "--port", str(sched),
            "--dashboard-address", f"127.0.0.1:{dash}", "--no-show",
        ]  # fmt: skip
        environ = (
            base_env()
            | environment
            | {
                "JOBTUNNEL_SERVICES": f"scheduler={sched},dashboard={dash}",
                "_CONDOR_JOB_AD": str(job_ad),
                "_CONDOR_SCRATCH_DIR": str(scratch),
            }
        )
        worker_argv = [
            sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{sched}",
            "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
        ]  # fmt: skip
        with (
            process(command, tmp_path / "agent.log", environ, cwd=scratch) as agent,
            process(worker_argv, tmp_path / "worker.log", base_env()) as worker,
        ):
            tunnel = wait_until(
                _quiet(lambda: only_tunnel(fw)), "the wrapper's tunnel", alive=[agent, worker]
            )
            assert tunnel["user"] == "alice"
            assert tunnel["job"]["global_job_id"] == "ap1.example.org#4242.0#1717171717"
            assert tunnel["job"]["schedd"] == "ap1.example.org"
            assert dask_sum_of_squares(tunnel["services"]["scheduler"]) == sum(
                x * x for x in range(200)
            )
            agent.stop(grace=DEADLINE)
            assert agent.proc.returncode == 0
