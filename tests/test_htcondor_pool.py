"""Against a real HTCondor pool, only when one is configured.

No schedd can run on the development machines (the PyPI htcondor package has no daemons), so
these tests skip unless ``JOBTUNNEL_TEST_SCHEDD`` names a schedd (and, if the local HTCondor
configuration does not point at the pool, ``JOBTUNNEL_TEST_COLLECTOR`` names its collector).
Authentication comes from the usual HTCondor configuration (``CONDOR_CONFIG``, ``_condor_*``).
"""

from __future__ import annotations

import os

import pytest

from daemons.reconciler.jobs import JobPhase, JobStateSource, htcondor_schedd_factory

SCHEDD = os.environ.get("JOBTUNNEL_TEST_SCHEDD", "")
COLLECTOR = os.environ.get("JOBTUNNEL_TEST_COLLECTOR") or None

pytestmark = [
    pytest.mark.skipif(not SCHEDD, reason="no HTCondor pool: set JOBTUNNEL_TEST_SCHEDD"),
    pytest.mark.anyio,
]


async def test_held_then_removed_job_is_seen() -> None:
    htcondor2 = pytest.importorskip("htcondor2")
    schedd_for = htcondor_schedd_factory(COLLECTOR)
    schedd = schedd_for(SCHEDD)
    # Submitted on hold: its state is known at once, nothing has to run or be waited for.
    description = htcondor2.Submit(
        {"executable": "/bin/sleep", "arguments": "600", "hold": "true", "universe": "vanilla"}
    )
    result = schedd.submit(description, count=1)  # type: ignore[attr-defined]
    cluster = result.cluster()
    try:
        (ad,) = schedd.query(constraint=f"ClusterId == {cluster}", projection=["GlobalJobId"])
        gid = ad["GlobalJobId"]
        source = JobStateSource(schedd_for)
        state = (await source.poll([gid]))[gid]
        assert state is not None
        assert state.phase is JobPhase.HELD
        assert state.ended
    finally:
        schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {cluster}")  # type: ignore[attr-defined]
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert state.phase is JobPhase.REMOVED


async def test_unknown_job_is_missing() -> None:
    source = JobStateSource(htcondor_schedd_factory(COLLECTOR))
    gid = f"{SCHEDD}#999999999.0#1"
    state = (await source.poll([gid]))[gid]
    assert state is not None
    assert state.phase is JobPhase.MISSING
