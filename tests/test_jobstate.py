"""JobStateSource against FakeSchedd: real ClassAd files, real constraint evaluation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import classad2
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemons.reconciler.jobs import (
    PROJECTION,
    JobPhase,
    JobState,
    JobStateSource,
    ScheddLike,
    ids_constraint,
    state_from_ad,
)
from tests.fakes.schedd import FakeSchedd

pytestmark = pytest.mark.anyio

IDLE, RUNNING, REMOVED, COMPLETED, HELD, TRANSFERRING, SUSPENDED = range(1, 8)


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, FakeSchedd]:
    names = ["ap1.example.org", "ap2.example.org", "ap3.example.org"]
    return {name: FakeSchedd(tmp_path / name, name) for name in names}


def factory(pool: dict[str, FakeSchedd]) -> Callable[[str], ScheddLike]:
    def schedd_for(name: str) -> ScheddLike:
        return pool[name]  # KeyError for an unknown schedd, like a failed locate

    return schedd_for


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def source(pool: dict[str, FakeSchedd], registry: CollectorRegistry) -> JobStateSource:
    return JobStateSource(factory(pool), registry=registry, timeout=5)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_running_job(pool: dict[str, FakeSchedd], source: JobStateSource) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, RUNNING, EnteredCurrentStatus=1717171800)
    states = await source.poll([gid])
    assert states == {gid: JobState(gid, JobPhase.RUNNING, "running", 1717171800.0)}
    assert not states[gid].ended  # type: ignore[union-attr]


async def test_held_job_reason_is_hold_reason(
    pool: dict[str, FakeSchedd], source: JobStateSource
) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, RUNNING)
    reason = 'Error from slot1@wn-042: SINGULARITY_JOB: "docker://x" failed to pull'
    ap1.set_status(gid, HELD, HoldReason=reason, HoldReasonCode=34)
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert (state.phase, state.reason, state.ended) == (JobPhase.HELD, reason, True)


async def test_held_without_reason(pool: dict[str, FakeSchedd], source: JobStateSource) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, HELD, HoldReasonCode=12)
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert state.reason == "held (HoldReasonCode 12)"


async def test_removed_job_still_in_queue(
    pool: dict[str, FakeSchedd], source: JobStateSource
) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, REMOVED, RemoveReason="via condor_rm (by user alice)")
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert state.phase is JobPhase.REMOVED
    assert state.reason == "removed: via condor_rm (by user alice)"
    assert state.ended
    assert ap1.history_calls == []


async def test_completed_job_from_history(
    pool: dict[str, FakeSchedd], source: JobStateSource, registry: CollectorRegistry
) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, RUNNING)
    ap1.set_status(gid, COMPLETED, ExitCode=3, EnteredCurrentStatus=1717180000)
    ap1.move_to_history(gid)
    state = (await source.poll([gid]))[gid]
    assert state == JobState(gid, JobPhase.COMPLETED, "completed with exit code 3", 1717180000.0)
    assert len(ap1.query_calls) == 1
    assert len(ap1.history_calls) == 1
    assert ap1.history_calls[0]["match"] == 1
    assert ap1.history_calls[0]["projection"] == list(PROJECTION)
    assert metric(
        registry, "jobtunnel_schedd_queries_total", schedd="ap1.example.org", kind="history"
    ) == (1.0)


async def test_removed_job_from_history(
    pool: dict[str, FakeSchedd], source: JobStateSource
) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, REMOVED)
    ap1.move_to_history(gid)
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert (state.phase, state.reason) == (JobPhase.REMOVED, "removed")


async def test_missing_job(pool: dict[str, FakeSchedd], source: JobStateSource) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, RUNNING)
    ap1.forget(gid)
    state = (await source.poll([gid]))[gid]
    assert state == JobState(gid, JobPhase.MISSING, "not in queue or history", None)
    assert state.ended


async def test_history_is_asked_only_for_ids_not_in_the_queue(
    pool: dict[str, FakeSchedd], source: JobStateSource
) -> None:
    ap1 = pool["ap1.example.org"]
    queued, done, gone = ap1.gid(), ap1.gid(), ap1.gid()
    for gid in (queued, done, gone):
        ap1.put_job(gid, RUNNING)
    ap1.set_status(done, COMPLETED, ExitCode=0)
    ap1.move_to_history(done)
    ap1.forget(gone)
    states = await source.poll([queued, done, gone])
    assert {gid: s.phase for gid, s in states.items() if s} == {
        queued: JobPhase.RUNNING,
        done: JobPhase.COMPLETED,
        gone: JobPhase.MISSING,
    }
    assert len(ap1.query_calls) == 1
    assert len(ap1.history_calls) == 1
    assert ap1.history_calls[0]["constraint"] == ids_constraint([done, gone])
    assert ap1.history_calls[0]["match"] == 2


@pytest.mark.parametrize(
    ("status", "phase", "ended"),
    [
        (IDLE, JobPhase.IDLE, True),
        (RUNNING, JobPhase.RUNNING, False),
        (REMOVED, JobPhase.REMOVED, True),
        (COMPLETED, JobPhase.COMPLETED, True),
        (HELD, JobPhase.HELD, True),
        (TRANSFERRING, JobPhase.TRANSFERRING_OUTPUT, False),
        (SUSPENDED, JobPhase.SUSPENDED, False),
    ],
)
async def test_every_job_status_code(
    pool: dict[str, FakeSchedd], source: JobStateSource, status: int, phase: JobPhase, ended: bool
) -> None:
    ap1 = pool["ap1.example.org"]
    gid = ap1.gid()
    ap1.put_job(gid, status)
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert (state.phase, state.ended) == (phase, ended)


def test_status_codes_match_the_binding() -> None:
    htcondor2 = pytest.importorskip("htcondor2")
    from daemons.reconciler.jobs import _STATUS_CODES

    assert {code: phase.name for code, phase in _STATUS_CODES.items()} == {
        int(s): s.name for s in htcondor2.JobStatus
    }


def test_unknown_status_is_not_interpreted() -> None:
    ad = classad2.ClassAd({"GlobalJobId": "a#1.0#1", "JobStatus": 9})
    assert state_from_ad(ad) is None


async def test_unreachable_schedd_is_unknown_and_isolated(
    pool: dict[str, FakeSchedd], source: JobStateSource, registry: CollectorRegistry
) -> None:
    ap1, ap2 = pool["ap1.example.org"], pool["ap2.example.org"]
    down = [ap1.gid(), ap1.gid()]
    up = ap2.gid()
    for gid in down:
        ap1.put_job(gid, RUNNING)
    ap2.put_job(up, RUNNING)
    ap1.unreachable = True
    with capture_logs() as logs:
        states = await source.poll([*down, up])
    assert states[down[0]] is None
    assert states[down[1]] is None
    assert states[up] is not None
    assert states[up].phase is JobPhase.RUNNING
    assert metric(registry, "jobtunnel_schedd_errors_total", schedd="ap1.example.org") == 1.0
    assert metric(registry, "jobtunnel_schedd_errors_total", schedd="ap2.example.org") == 0.0
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["schedd"] == "ap1.example.org"
    assert "HTCondorException" in warnings[0]["error"]
    assert "Failed to connect" in warnings[0]["error"]


async def test_factory_failure_is_unknown(registry: CollectorRegistry) -> None:
    def no_collector(name: str) -> ScheddLike:
        raise RuntimeError(f"Unable to locate schedd {name}")

    source = JobStateSource(no_collector, registry=registry)
    gid = "ap9.example.org#1.0#1"
    with capture_logs() as logs:
        assert await source.poll([gid]) == {gid: None}
    assert metric(registry, "jobtunnel_schedd_errors_total", schedd="ap9.example.org") == 1.0
    assert logs[0]["event"] == "schedd unreachable"


async def test_hung_schedd_times_out_as_unknown(
    pool: dict[str, FakeSchedd], registry: CollectorRegistry
) -> None:
    ap1, ap2 = pool["ap1.example.org"], pool["ap2.example.org"]
    stuck, fine = ap1.gid(), ap2.gid()
    ap1.put_job(stuck, RUNNING)
    ap2.put_job(fine, RUNNING)
    ap1.hang = threading.Event()
    source = JobStateSource(factory(pool), registry=registry, timeout=0.2)
    try:
        states = await source.poll([stuck, fine])
    finally:
        ap1.hang.set()  # let the abandoned worker thread finish
    assert states[stuck] is None
    assert states[fine] is not None
    assert metric(registry, "jobtunnel_schedd_errors_total", schedd="ap1.example.org") == 1.0


async def test_bad_global_job_id_is_unknown(source: JobStateSource) -> None:
    with capture_logs() as logs:
        assert await source.poll(["not-a-global-job-id"]) == {"not-a-global-job-id": None}
    assert logs[0]["event"] == "bad GlobalJobId"


async def test_500_jobs_on_3_schedds_cost_3_queries(
    pool: dict[str, FakeSchedd], source: JobStateSource, registry: CollectorRegistry
) -> None:
    schedds = list(pool.values())
    ids = []
    for i in range(500):
        schedd = schedds[i % 3]
        gid = schedd.gid()
        schedd.put_job(gid, RUNNING)
        ids.append(gid)
    states = await source.poll(ids)
    assert len(states) == 500
    assert all(s is not None and s.phase is JobPhase.RUNNING for s in states.values())
    assert [len(s.query_calls) for s in schedds] == [1, 1, 1]
    assert [len(s.history_calls) for s in schedds] == [0, 0, 0]
    for schedd in schedds:
        assert schedd.query_calls[0]["projection"] == list(PROJECTION)
        assert (
            metric(registry, "jobtunnel_schedd_queries_total", schedd=schedd.name, kind="queue")
            == 1.0
        )
    assert registry.get_sample_value("jobtunnel_schedd_query_seconds_count", {"kind": "queue"}) == 3


async def test_only_the_asked_jobs_are_returned(
    pool: dict[str, FakeSchedd], source: JobStateSource
) -> None:
    ap1 = pool["ap1.example.org"]
    mine, other = ap1.gid(), ap1.gid()
    ap1.put_job(mine, RUNNING)
    ap1.put_job(other, HELD)
    assert list(await source.poll([mine])) == [mine]


def test_constraint_quotes_ids_safely() -> None:
    # A hostile id cannot break out of the string literal and widen the match.
    evil = 'x" || true || "'
    other = classad2.ClassAd({"GlobalJobId": "ap1#1.0#1"})
    target = classad2.ClassAd({"GlobalJobId": evil})
    expr = classad2.ExprTree(ids_constraint([evil]))
    assert expr.eval(other) is False
    assert expr.eval(target) is True


def test_constraint_is_exact_not_case_insensitive() -> None:
    ad = classad2.ClassAd({"GlobalJobId": "AP1.example.org#1.0#1"})
    assert classad2.ExprTree(ids_constraint(["ap1.example.org#1.0#1"])).eval(ad) is False


def test_private_registry_by_default(pool: dict[str, FakeSchedd]) -> None:
    # Two sources must not collide in a shared (global) registry.
    a = JobStateSource(factory(pool))
    b = JobStateSource(factory(pool))
    assert a.registry is not b.registry
