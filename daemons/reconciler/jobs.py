"""Whether the HTCondor jobs behind published sessions are still running.

A session only proves the agent *was* connected; a job that was held, removed or evicted can
leave a Tunnel behind for a while (a half-open TCP connection, a forwarder that has not noticed).
The reconciler asks the schedds directly, with one batched queue query per schedd and one
history query for the ids the queue no longer holds, so the cost does not grow with the number
of sessions.

Three answers are kept apart on purpose:

* a :class:`JobState` whose ``ended`` is False: the job process runs, keep routing;
* a :class:`JobState` whose ``ended`` is True (including ``MISSING``): undo the routing;
* ``None``: the schedd could not be asked. Nothing may change on ``None``: a schedd restart or a
  network blip must never tear down every user's Dask cluster.

This module knows nothing about Kubernetes; the htcondor2 binding is only imported by the
factory that builds real schedd clients, so tests run against a fake with the same surface.
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import classad2
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROJECTION: tuple[str, ...] = (
    "GlobalJobId",
    "JobStatus",
    "HoldReason",
    "HoldReasonCode",
    "EnteredCurrentStatus",
    "ExitCode",
    "RemoveReason",
)

DEFAULT_TIMEOUT = 30.0


class JobPhase(enum.Enum):
    """HTCondor's JobStatus codes 1..7, plus MISSING for a job in neither queue nor history."""

    IDLE = "Idle"
    RUNNING = "Running"
    REMOVED = "Removed"
    COMPLETED = "Completed"
    HELD = "Held"
    TRANSFERRING_OUTPUT = "TransferringOutput"
    SUSPENDED = "Suspended"
    MISSING = "Missing"

    @property
    def ended(self) -> bool:
        """True when no scheduler process can be behind a session claiming this job.

        IDLE counts as ended: a Tunnel exists only because the job already ran and its agent
        connected, so an idle job has been evicted (or rescheduled) and its process is gone.
        When it runs again its agent opens a new session. SUSPENDED and TRANSFERRING_OUTPUT keep
        the process (or its last moments) alive, so they are not ended.
        """
        return self in _ENDED


_ENDED = frozenset(
    {JobPhase.IDLE, JobPhase.HELD, JobPhase.REMOVED, JobPhase.COMPLETED, JobPhase.MISSING}
)

# htcondor2.JobStatus has the same values; kept literal so this module imports without it.
_STATUS_CODES: dict[int, JobPhase] = {
    1: JobPhase.IDLE,
    2: JobPhase.RUNNING,
    3: JobPhase.REMOVED,
    4: JobPhase.COMPLETED,
    5: JobPhase.HELD,
    6: JobPhase.TRANSFERRING_OUTPUT,
    7: JobPhase.SUSPENDED,
}


@dataclass(frozen=True)
class JobState:
    """One job's state as the schedd reported it, with a human-readable reason for Events."""

    global_job_id: str
    phase: JobPhase
    reason: str
    entered_status_at: float | None

    @property
    def ended(self) -> bool:
        return self.phase.ended


class ScheddLike(Protocol):
    """The part of ``htcondor2.Schedd`` this module calls, with the binding's own names."""

    def query(
        self,
        constraint: str = ...,
        projection: list[str] = ...,
    ) -> list[Any]: ...

    def history(
        self,
        constraint: str | None = ...,
        projection: list[str] = ...,
        match: int = ...,
    ) -> list[Any]: ...


def schedd_of(global_job_id: str) -> str:
    """The schedd name in a GlobalJobId: the part before the first '#'."""
    schedd, sep, rest = global_job_id.partition("#")
    if not sep or not schedd or not rest:
        raise ValueError(
            f"GlobalJobId {global_job_id!r} is not of the form schedd#cluster.proc#time"
        )
    return schedd


def ids_constraint(global_job_ids: Sequence[str]) -> str:
    """A ClassAd constraint matching exactly these GlobalJobIds.

    ``identicalMember`` compares with ``=?=`` (case-sensitive, never undefined), where
    ``member`` would use the case-insensitive ``==``. Every id goes through ``classad2.quote``
    so a quote or backslash in an id cannot change the expression.
    """
    items = ", ".join(classad2.quote(i) for i in global_job_ids)
    return f"identicalMember(GlobalJobId, {{{items}}})"


def _attr(ad: Any, name: str) -> Any:
    """An attribute's evaluated value, None when absent, undefined or an error."""
    if name not in ad:
        return None
    value = ad.eval(name)
    if isinstance(value, classad2.Value):
        return None
    return value


def state_from_ad(ad: Any) -> JobState | None:
    """Turn a projected job ad into a JobState; None for an ad we cannot interpret."""
    gid = _attr(ad, "GlobalJobId")
    status = _attr(ad, "JobStatus")
    if not isinstance(gid, str) or isinstance(status, bool) or not isinstance(status, int):
        return None
    phase = _STATUS_CODES.get(status)
    if phase is None:
        return None
    entered = _attr(ad, "EnteredCurrentStatus")
    entered_at = float(entered) if isinstance(entered, int | float) else None
    if phase is JobPhase.HELD:
        hold = _attr(ad, "HoldReason")
        code = _attr(ad, "HoldReasonCode")
        reason = str(hold) if hold else "held"
        if not hold and isinstance(code, int):
            reason = f"held (HoldReasonCode {code})"
    elif phase is JobPhase.REMOVED:
        why = _attr(ad, "RemoveReason")
        reason = f"removed: {why}" if why else "removed"
    elif phase is JobPhase.COMPLETED:
        code = _attr(ad, "ExitCode")
        if isinstance(code, int) and not isinstance(code, bool):
            reason = f"completed with exit code {code}"
        else:
            reason = "completed (no exit code: killed by a signal?)"
    elif phase is JobPhase.TRANSFERRING_OUTPUT:
        reason = "transferring output"
    else:
        reason = phase.value.lower()
    return JobState(gid, phase, reason, entered_at)


class JobStateSource:
    """Batched job state lookups across schedds.

    ``schedd_for`` maps a schedd name (from a GlobalJobId) to a client; it is called once per
    schedd per poll, in a worker thread, so a factory that locates the schedd through the
    collector follows a schedd that moved. Every blocking call has ``timeout`` seconds.
    """

    def __init__(
        self,
        schedd_for: Callable[[str], ScheddLike],
        *,
        registry: CollectorRegistry | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._schedd_for = schedd_for
        self._timeout = timeout
        self.registry = registry if registry is not None else CollectorRegistry()
        self._queries = Counter(
            "jobtunnel_schedd_queries",
            "Queries sent to schedds, by kind (queue or history)",
            ["schedd", "kind"],
            registry=self.registry,
        )
        self._errors = Counter(
            "jobtunnel_schedd_errors",
            "Schedd polls that failed (unreachable, timeout): its jobs stay unknown",
            ["schedd"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "jobtunnel_schedd_query_seconds",
            "Duration of one schedd query",
            ["kind"],
            registry=self.registry,
        )

    async def poll(self, global_job_ids: Iterable[str]) -> dict[str, JobState | None]:
        """The state of each job; None where its schedd could not be asked (change nothing)."""
        result: dict[str, JobState | None] = {}
        by_schedd: dict[str, list[str]] = {}
        for gid in dict.fromkeys(global_job_ids):
            try:
                by_schedd.setdefault(schedd_of(gid), []).append(gid)
            except ValueError as exc:
                log.warning("bad GlobalJobId", global_job_id=gid, error=str(exc))
                result[gid] = None
        # Schedds are asked concurrently: one slow or dead schedd costs its own timeout only.
        async with anyio.create_task_group() as tg:
            for name, ids in by_schedd.items():
                tg.start_soon(self._poll_schedd, name, ids, result)
        return result

    async def _poll_schedd(
        self, name: str, ids: list[str], result: dict[str, JobState | None]
    ) -> None:
        try:
            found = await self._ask(name, ids)
        except Exception as exc:
            self._errors.labels(schedd=name).inc()
            log.warning(
                "schedd unreachable",
                schedd=name,
                jobs=len(ids),
                error=f"{type(exc).__name__}: {exc}",
            )
            for gid in ids:
                result[gid] = None
            return
        for gid in ids:
            result[gid] = found.get(gid) or JobState(
                gid, JobPhase.MISSING, "not in queue or history", None
            )

    async def _ask(self, name: str, ids: list[str]) -> dict[str, JobState]:
        schedd = await self._blocking(functools.partial(self._schedd_for, name))
        wanted = set(ids)
        ads = await self._timed(
            name,
            "queue",
            functools.partial(
                schedd.query, constraint=ids_constraint(ids), projection=list(PROJECTION)
            ),
        )
        found = self._collect(ads, wanted, {})
        missing = [gid for gid in ids if gid not in found]
        if missing:
            ads = await self._timed(
                name,
                "history",
                functools.partial(
                    schedd.history,
                    constraint=ids_constraint(missing),
                    projection=list(PROJECTION),
                    match=len(missing),
                ),
            )
            # History lists the newest record first; keep that one if a job appears twice.
            self._collect(ads, set(missing), found)
        return found

    @staticmethod
    def _collect(
        ads: Iterable[Any], wanted: set[str], into: dict[str, JobState]
    ) -> dict[str, JobState]:
        for ad in ads:
            state = state_from_ad(ad)
            if state is None:
                log.warning("uninterpretable job ad", ad=str(ad)[:200])
                continue
            if state.global_job_id in wanted and state.global_job_id not in into:
                into[state.global_job_id] = state
        return into

    async def _timed(self, name: str, kind: str, call: Callable[[], T]) -> T:
        self._queries.labels(schedd=name, kind=kind).inc()
        started = time.perf_counter()
        try:
            return await self._blocking(call)
        finally:
            self._seconds.labels(kind=kind).observe(time.perf_counter() - started)

    async def _blocking(self, call: Callable[[], T]) -> T:
        # The binding cannot be interrupted; on timeout the thread is abandoned, not joined,
        # so the poll returns on time and the stuck call finishes (or fails) on its own.
        with anyio.fail_after(self._timeout):
            return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


def htcondor_schedd_factory(
    collector: str | None,
    *,
    token_file: Path | None = None,
    scitoken_file: Path | None = None,
) -> Callable[[str], ScheddLike]:
    """Build ``schedd_for``: locate a schedd by name through the collector, return a client.

    Security, as the htcondor2 25.x binding allows it (checked in its source): ``Schedd`` takes
    no security argument at all, and ``SecurityContext(token=...)`` is accepted only by
    ``Collector`` and ``ping``; there is no ``SecMan`` in htcondor2. So credentials for the schedd
    must come from the HTCondor configuration, which ``htcondor2.param`` sets in-process:

    * IDTOKEN: ``SEC_TOKEN_DIRECTORY`` is pointed at the token file's directory (HTCondor clients
      read every token file in that directory, so mount the token alone there, e.g. a Kubernetes
      Secret volume), and the same token is passed by value to the collector through
      ``SecurityContext`` so the locate step does not depend on the directory scan.
    * SciToken: ``SCITOKENS_FILE`` names the file; a refreshed file is re-read at each
      authentication.

    Anything else (``SEC_CLIENT_AUTHENTICATION_METHODS``, CA files) comes from the normal
    configuration (``CONDOR_CONFIG`` or ``_condor_*`` environment variables) and is left alone.
    """
    import htcondor2

    if token_file is not None:
        htcondor2.param["SEC_TOKEN_DIRECTORY"] = str(token_file.parent)
    if scitoken_file is not None:
        htcondor2.param["SCITOKENS_FILE"] = str(scitoken_file)

    def schedd_for(name: str) -> ScheddLike:
        security = None
        if token_file is not None:
            security = htcondor2.SecurityContext(token=token_file.read_text().strip())
        ad = htcondor2.Collector(collector, security=security).locate(
            htcondor2.DaemonType.Schedd, name
        )
        schedd: ScheddLike = htcondor2.Schedd(ad)
        return schedd

    return schedd_for
