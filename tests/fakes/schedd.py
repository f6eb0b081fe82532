"""A fake schedd: stands in for ``htcondor2.Schedd`` because no schedd can run on these machines.

The PyPI ``htcondor`` package ships the Python bindings only, not the daemons, so tests cannot
talk to a real *condor_schedd*. This fake keeps what can be kept real: job ads are old-syntax
ClassAd files on disk (``queue/`` and ``history/``), parsed with the real ``classad2`` library;
constraints are evaluated by the real ClassAd engine against each ad, and projections build real
``classad2.ClassAd`` objects. Only the network and the schedd's bookkeeping are faked.

It implements exactly the subset of ``htcondor2.Schedd`` that ``daemons.reconciler.jobs`` uses,
with the binding's method and keyword names (``query(constraint=, projection=)``,
``history(constraint=, projection=, match=)``), so a call that works here has the same shape
against a real schedd. An unreachable schedd raises ``htcondor2.HTCondorException`` with the
message the 25.x binding gives for a refused connection (observed against a closed port).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import classad2
import htcondor2


def _file_name(global_job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", global_job_id) + ".ad"


class FakeSchedd:
    """A schedd whose queue and history are directories of job ad files."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root
        self.queue_dir = root / "queue"
        self.history_dir = root / "history"
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.history_dir.mkdir(parents=True, exist_ok=True)
        self.query_calls: list[dict[str, Any]] = []
        self.history_calls: list[dict[str, Any]] = []
        self.unreachable = False
        # When set, calls block until it is set again from the test (simulates a hung schedd).
        self.hang: threading.Event | None = None
        self._history_seq = 0
        self._next_cluster = 1

    # -- the htcondor2.Schedd subset -------------------------------------------------------

    def query(
        self, constraint: str = "True", projection: list[str] | None = None
    ) -> list[classad2.ClassAd]:
        self.query_calls.append({"constraint": constraint, "projection": list(projection or [])})
        self._network()
        return self._select(sorted(self.queue_dir.glob("*.ad")), constraint, projection, -1)

    def history(
        self,
        constraint: str | None = None,
        projection: list[str] | None = None,
        match: int = -1,
    ) -> list[classad2.ClassAd]:
        self.history_calls.append(
            {"constraint": constraint, "projection": list(projection or []), "match": match}
        )
        self._network()
        # The real history query returns the most recently recorded jobs first.
        files = sorted(self.history_dir.glob("*.ad"), reverse=True)
        return self._select(files, constraint or "True", projection, match)

    # -- test helpers ----------------------------------------------------------------------

    def gid(self, cluster: int | None = None, proc: int = 0, qdate: int = 1_700_000_000) -> str:
        """A GlobalJobId on this schedd (a fresh cluster id when none is given)."""
        if cluster is None:
            cluster = self._next_cluster
            self._next_cluster += 1
        return f"{self.name}#{cluster}.{proc}#{qdate}"

    def put_job(self, global_job_id: str, status: int, **attrs: Any) -> Path:
        """Write a job ad into the queue; attrs override the defaults a schedd would set."""
        _schedd, _, rest = global_job_id.partition("#")
        job_id, _, qdate = rest.partition("#")
        cluster, _, proc = job_id.partition(".")
        ad = classad2.ClassAd(
            {
                "MyType": "Job",
                "GlobalJobId": global_job_id,
                "ClusterId": int(cluster),
                "ProcId": int(proc or 0),
                "QDate": int(qdate or 0),
                "Owner": "alice",
                "JobStatus": status,
                "EnteredCurrentStatus": int(time.time()),
            }
        )
        for key, value in attrs.items():
            ad[key] = value
        path = self.queue_dir / _file_name(global_job_id)
        path.write_text(ad.printOld())
        return path

    def set_status(self, global_job_id: str, status: int, **attrs: Any) -> None:
        """Change a queued job's status (and any attributes), as a schedd would."""
        path = self._queue_path(global_job_id)
        ad = classad2.parseOne(path.read_text(), classad2.ParserType.Old)
        ad["JobStatus"] = status
        ad["EnteredCurrentStatus"] = attrs.pop("EnteredCurrentStatus", int(time.time()))
        for key, value in attrs.items():
            ad[key] = value
        path.write_text(ad.printOld())

    def move_to_history(self, global_job_id: str) -> None:
        """The job leaves the queue and is recorded in the history, newest last on disk."""
        path = self._queue_path(global_job_id)
        self._history_seq += 1
        path.rename(self.history_dir / f"{self._history_seq:08d}-{path.name}")

    def forget(self, global_job_id: str) -> None:
        """The job is gone from queue and history (history rotated away)."""
        path = self.queue_dir / _file_name(global_job_id)
        path.unlink(missing_ok=True)
        for old in self.history_dir.glob(f"*-{_file_name(global_job_id)}"):
            old.unlink()

    # -- internals -------------------------------------------------------------------------

    def _queue_path(self, global_job_id: str) -> Path:
        path = self.queue_dir / _file_name(global_job_id)
        if not path.exists():
            raise KeyError(f"{global_job_id} is not in the fake queue")
        return path

    def _network(self) -> None:
        if self.hang is not None:
            self.hang.wait()
        if self.unreachable:
            raise htcondor2.HTCondorException(
                "Failed to fetch ads from schedd, errmsg=CEDAR:6001:Failed to connect to "
                f"<{self.name}:9618>"
            )

    @staticmethod
    def _select(
        files: list[Path], constraint: str, projection: list[str] | None, limit: int
    ) -> list[classad2.ClassAd]:
        expr = classad2.ExprTree(constraint)
        out: list[classad2.ClassAd] = []
        for path in files:
            ad = classad2.parseOne(path.read_text(), classad2.ParserType.Old)
            # Like the schedd, only a result of exactly true matches (undefined does not).
            if expr.eval(ad) is not True:
                continue
            if projection:
                projected = classad2.ClassAd()
                for attr in projection:
                    if attr in ad:
                        projected[attr] = ad.lookup(attr)
                ad = projected
            out.append(ad)
            if 0 <= limit <= len(out):
                break
        return out
