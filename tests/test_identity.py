"""The agent's job identity (from a real-syntax HTCondor job ad) and its private IP."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemons.agent.identity import (
    JobAdError,
    JobIdentity,
    detect_private_ip,
    job_identity_from_environment,
    read_job_ad,
)

# What a schedd writes to .job.ad in the scratch directory of a job submitted by the InterLink
# HTCondor plugin (its JDL sets +MaxWallTimeMins and +WMAgent_AgentName), in the old ClassAd
# syntax: one "Attr = expression" per line, strings quoted with \" escapes, bare expressions.
REAL_JOB_AD = r"""Arguments = ""
BufferBlockSize = 32768
ClusterId = 4242
Cmd = "/var/lib/interlink/dask-scheduler-7f9c-0b1e/dask-scheduler-7f9c-0b1e.sh"
CommittedTime = 0
CompletionDate = 0
CurrentHosts = 1
DiskUsage = 75
EnteredCurrentStatus = 1717171800
Environment = "JOBTUNNEL_USER=alice DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT='30s'"
Err = "err/mm_mul.err.4242.0"
ExitBySignal = false
GlobalJobId = "ap1.example.org#4242.0#1717171717"
HoldReasonCode = undefined
ImageSize = 1000
In = "/dev/null"
Iwd = "/var/lib/interlink/dask-scheduler-7f9c-0b1e"
JobCurrentStartDate = 1717171800
JobPrio = 0
JobRunCount = 1
JobStartDate = 1717171800
JobStatus = 2
JobUniverse = 5
LastJobStatus = 1
Log = "/var/lib/interlink/dask-scheduler-7f9c-0b1e/log/mm_mul.4242.0.log"
MaxWallTimeMins = 60
MyType = "Job"
NumJobStarts = 1
NumShadowStarts = 1
OnExitHold = false
OnExitRemove = true
Out = "out/mm_mul.out.4242.0"
Owner = "alice"
PeriodicRelease = (HoldReasonCode == 12 && HoldReasonSubCode == 13)
ProcId = 0
QDate = 1717171717
RemoteHost = "slot1_3@wn-042.example.org"
RequestCpus = 1
RequestDisk = DiskUsage
RequestMemory = 2048
Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX") && (TARGET.Disk >= RequestDisk) && (TARGET.Memory >= RequestMemory) && (TARGET.HasFileTransfer)
ShouldTransferFiles = "YES"
TargetType = "Machine"
TransferInput = "/var/lib/interlink/dask-scheduler-7f9c-0b1e/secrets/jobtunnel-token/token"
User = "alice@example.org"
WantRemoteIO = true
WhenToTransferOutput = "ON_EXIT_OR_EVICT"
WMAgent_AgentName = "whatever"
"""  # noqa: E501


def write(tmp_path: Path, text: str, name: str = ".job.ad") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def without(attr: str) -> str:
    return "".join(
        line + "\n" for line in REAL_JOB_AD.splitlines() if not line.startswith(f"{attr} =")
    )


def test_reads_a_real_job_ad(tmp_path: Path) -> None:
    identity = read_job_ad(write(tmp_path, REAL_JOB_AD))
    assert identity == JobIdentity(
        global_job_id="ap1.example.org#4242.0#1717171717",
        cluster_id=4242,
        proc_id=0,
        owner="alice",
        schedd="ap1.example.org",
    )
    assert type(identity.cluster_id) is int


def test_values_are_evaluated_not_split(tmp_path: Path) -> None:
    # A ClassAd string with escaped quotes and '#' and an integer given as an expression.
    text = (
        'GlobalJobId = "sched\\"d#7.3#1"\n'
        "ClusterId = 3 + 4\n"
        "ProcId = ClusterId - 4\n"
        'Owner = "bob"\n'
    )
    identity = read_job_ad(write(tmp_path, text))
    assert identity.global_job_id == 'sched"d#7.3#1'
    assert identity.schedd == 'sched"d'
    assert (identity.cluster_id, identity.proc_id) == (7, 3)


def test_owner_is_optional(tmp_path: Path) -> None:
    assert read_job_ad(write(tmp_path, without("Owner"))).owner is None


@pytest.mark.parametrize("attr", ["GlobalJobId", "ClusterId", "ProcId"])
def test_missing_attribute_is_named(tmp_path: Path, attr: str) -> None:
    path = write(tmp_path, without(attr))
    with pytest.raises(JobAdError) as err:
        read_job_ad(path)
    assert str(err.value) == f"job ad {path}: missing attribute {attr}"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('ClusterId = "4242"', "attribute ClusterId is not an integer: '4242'"),
        ("ClusterId = true", "attribute ClusterId is not an integer: True"),
        ("ClusterId = NoSuchAttribute", "attribute ClusterId evaluates to undefined"),
        ("GlobalJobId = 17", "attribute GlobalJobId is not a non-empty string: 17"),
        ('GlobalJobId = "no-hash-here"', "is not of the form schedd#cluster.proc#time"),
        ('GlobalJobId = "#4242.0#1"', "is not of the form schedd#cluster.proc#time"),
    ],
)
def test_wrong_values_are_named(tmp_path: Path, line: str, problem: str) -> None:
    attr = line.split(" ", 1)[0]
    path = write(tmp_path, without(attr) + line + "\n")
    with pytest.raises(JobAdError, match=re.escape(str(path))) as err:
        read_job_ad(path)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "not a ClassAd (no attributes)"),
        ("\n# only a comment\n", "not a ClassAd (no attributes)"),
        ("this is not a classad\n", "line 1 is not a ClassAd attribute"),
        (REAL_JOB_AD.replace("JobPrio = 0", "JobPrio = = 0"), "line 19 is not a ClassAd attribute"),
        (REAL_JOB_AD + 'Truncated = "unterminated\n', "line 49 is not a ClassAd attribute"),
        ("[ ClusterId = 1; ProcId = 0 ]\n", "line 1 is not a ClassAd attribute"),
    ],
)
def test_corrupt_content(tmp_path: Path, text: str, problem: str) -> None:
    # classad2 alone would stop at the bad line and return a partial ad without complaint.
    with pytest.raises(JobAdError) as err:
        read_job_ad(write(tmp_path, text))
    assert problem in str(err.value)


def test_binary_content(tmp_path: Path) -> None:
    path = tmp_path / ".job.ad"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    with pytest.raises(JobAdError, match="binary content"):
        read_job_ad(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / ".job.ad"
    path.write_bytes(b'Owner = "\xe9l\xe8ve"\n')
    with pytest.raises(JobAdError, match="not UTF-8 text"):
        read_job_ad(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.ad"
    with pytest.raises(JobAdError) as err:
        read_job_ad(path)
    assert str(err.value) == f"job ad {path}: unreadable: no such file"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(JobAdError, match="unreadable: is a directory"):
        read_job_ad(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, REAL_JOB_AD)
    path.chmod(0)
    with pytest.raises(JobAdError) as err:
        read_job_ad(path)
    assert str(err.value) == f"job ad {path}: unreadable: permission denied"


def test_environment_without_job_ad_is_none() -> None:
    with capture_logs() as logs:
        assert job_identity_from_environment({}) is None
    assert [entry["log_level"] for entry in logs] == ["info"]
    assert logs[0]["event"] == "no job ad"


def test_environment_with_job_ad(tmp_path: Path) -> None:
    path = write(tmp_path, REAL_JOB_AD)
    identity = job_identity_from_environment({"_CONDOR_JOB_AD": str(path)})
    assert identity is not None
    assert identity.schedd == "ap1.example.org"


@pytest.mark.parametrize("content", [None, "garbage here\n", without("ClusterId")])
def test_environment_with_bad_job_ad_warns(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / ".job.ad"
    if content is not None:
        path.write_text(content)
    with capture_logs() as logs:
        assert job_identity_from_environment({"_CONDOR_JOB_AD": str(path)}) is None
    assert len(logs) == 1
    entry = logs[0]
    assert entry["event"] == "job ad unreadable"
    assert entry["log_level"] == "warning"
    assert entry["path"] == str(path)
    assert entry["error"]


def test_private_ip_ipv4() -> None:
    assert detect_private_ip("127.0.0.1", 31022) == "127.0.0.1"


def test_private_ip_by_name() -> None:
    assert detect_private_ip("localhost", 31022) in {"127.0.0.1", "::1"}


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.connect(("::1", 9))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_private_ip_ipv6() -> None:
    assert detect_private_ip("::1", 31022) == "::1"


def test_private_ip_unresolvable() -> None:
    with pytest.raises(OSError, match=r"cannot resolve forwarder host 'no-such-host\.invalid'"):
        detect_private_ip("no-such-host.invalid", 31022)


def test_permission_denied_message_without_needing_non_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same path as test_unreadable_file, for machines where the tests run as root.
    path = write(tmp_path, REAL_JOB_AD)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with capture_logs() as logs:
        assert job_identity_from_environment({"_CONDOR_JOB_AD": str(path)}) is None
    assert logs[0]["error"] == "unreadable: permission denied"
