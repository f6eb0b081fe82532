"""Step 5 (issue 5): keep each Tunnel's HTCondor job state fresh, for the reconcile to act on.

The poller is separate from the reconcile on purpose: one batched query per schedd per interval
(:class:`daemons.reconciler.jobs.JobStateSource`) covers every Tunnel, while a reconcile is per
Tunnel. The poller stores the latest answer per GlobalJobId and enqueues the Tunnels whose answer
changed; the reconcile reads :meth:`JobPoller.state` and decides (ended: unroute and delete).

A new GlobalJobId wakes the poller early (at most once per ``min_gap``), so a held job is noticed
about one query after its Tunnel appears rather than one full interval later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog

from daemons.reconciler.jobs import JobState, JobStateSource
from daemons.reconciler.kube import Obj

log = structlog.get_logger(__name__)


def global_job_id(tunnel: Obj) -> str | None:
    job = (tunnel.get("spec") or {}).get("job") or {}
    gid = job.get("globalJobId")
    return gid if isinstance(gid, str) and gid else None


@dataclass(frozen=True)
class JobVerdict:
    """What the reconcile should do about a Tunnel's job: its JobRunning condition."""

    status: str  # "True", "False", "Unknown"
    reason: str
    message: str
    ended: bool = False


DISABLED = JobVerdict("Unknown", "JobChecksDisabled", "job checks disabled (no collector set)")


class JobPoller:
    def __init__(
        self,
        source: JobStateSource | None,
        *,
        tunnels: Callable[[], list[Obj]],
        enqueue: Callable[[str], None],
        interval: float = 30.0,
        min_gap: float = 1.0,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._tunnels = tunnels
        self._enqueue = enqueue
        self._interval = interval
        self._min_gap = min(min_gap, interval)
        self._on_error = on_error or (lambda: None)
        self._states: dict[str, JobState | None] = {}
        self._wake = anyio.Event()
        self.polls = 0

    @property
    def enabled(self) -> bool:
        return self._source is not None

    def verdict(self, tunnel: Obj) -> JobVerdict:
        if self._source is None:
            return DISABLED
        gid = global_job_id(tunnel)
        if gid is None:
            return JobVerdict("Unknown", "NoJobClaimed", "the session names no HTCondor job")
        if gid not in self._states:
            self._wake.set()
            return JobVerdict("Unknown", "NotCheckedYet", f"job {gid} not queried yet")
        state = self._states[gid]
        if state is None:
            return JobVerdict(
                "Unknown", "ScheddUnreachable", f"the schedd of job {gid} could not be asked"
            )
        if state.ended:
            reason = f"Job{state.phase.value}"
            return JobVerdict("False", reason, f"job {gid}: {state.reason}", ended=True)
        return JobVerdict("True", f"Job{state.phase.value}", f"job {gid}: {state.reason}")

    def notice(self, tunnel: Obj) -> None:
        """A Tunnel appeared or changed: poll soon if its job is new to us."""
        gid = global_job_id(tunnel)
        if self._source is not None and gid is not None and gid not in self._states:
            self._wake.set()

    async def run(self) -> None:
        if self._source is None:
            log.info("job checks disabled: no HTCondor collector configured")
            await anyio.sleep_forever()
        while True:
            # Fresh before the poll: a Tunnel noticed during the poll wakes the next one.
            self._wake = anyio.Event()
            started = anyio.current_time()
            await self.poll_once()
            with anyio.move_on_after(self._interval):
                await self._wake.wait()
            # Never more than one poll per min_gap, however many Tunnels appear.
            await anyio.sleep(max(0.0, self._min_gap - (anyio.current_time() - started)))

    async def poll_once(self) -> None:
        assert self._source is not None
        by_gid: dict[str, list[str]] = {}
        for tunnel in self._tunnels():
            gid = global_job_id(tunnel)
            if gid is not None:
                meta = tunnel.get("metadata") or {}
                by_gid.setdefault(gid, []).append(f"{meta.get('namespace')}/{meta.get('name')}")
        if not by_gid:
            self._states.clear()
            return
        try:
            result = await self._source.poll(by_gid)
        except Exception as exc:
            self._on_error()
            log.warning("job poll failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.polls += 1
        for gid, state in result.items():
            previous = self._states.get(gid, ...)
            self._states[gid] = state
            if previous != state:
                for key in by_gid.get(gid, []):
                    self._enqueue(key)
        for gid in [g for g in self._states if g not in by_gid]:
            del self._states[gid]
