"""Leader election on a coordination.k8s.io/v1 Lease (client-go's algorithm, trimmed).

Two reconciler replicas must never both patch the same Service, so only the Lease holder runs
the reconcile workers; the standby keeps its watches warm (and its /readyz green) so that a
takeover costs one relist at most.

* The holder renews every ``retry_period``; a replica that cannot renew for ``renew_deadline``
  stops leading *before* the Lease can expire (``renew_deadline < lease_duration``), so two
  leaders never overlap even when the old one is cut off from the API server.
* A candidate judges expiry by its own clock: the time it last *saw the record change*, plus
  the duration. Comparing ``renewTime`` with the local clock would trust clock sync between
  nodes; observing changes does not.
* Every write carries the read ``resourceVersion``: of two candidates racing for a free Lease
  one gets a 409 and stays standby.
* On a clean stop the holder releases the Lease (empty holder), so the standby takes over at its
  next try instead of waiting for expiry.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from daemons.reconciler.kube import call_json, micro_time

log = structlog.get_logger(__name__)


class LeaderElector:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._duration = lease_duration
        self._renew_deadline = renew_deadline
        self._retry = retry_period
        self._timeout = min(request_timeout, renew_deadline)
        self._clock = clock
        self._on_change = on_change or (lambda _leading: None)
        self._on_error = on_error or (lambda: None)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.leading = False

    async def run(
        self,
        lead: Callable[[], Awaitable[None]],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: wait for the Lease, run ``lead()`` while holding it, cancel it on loss."""
        task_status.started()
        try:
            while True:
                await self._acquire()
                await self._lead(lead)
        finally:
            if self.leading:
                self._set_leading(False)
                with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                    await self._release()

    def _set_leading(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            log.info("leadership", leading=leading, identity=self.identity, lease=self.name)
            self._on_change(leading)

    async def _acquire(self) -> None:
        while True:
            if await self._try():
                self._set_leading(True)
                return
            await anyio.sleep(self._retry * (0.8 + 0.4 * random.random()))  # noqa: S311

    async def _lead(self, lead: Callable[[], Awaitable[None]]) -> None:
        async with anyio.create_task_group() as tg:

            async def leader_work() -> None:
                await lead()
                tg.cancel_scope.cancel()  # lead() returning means: stop leading

            tg.start_soon(leader_work)
            last_renewal = self._clock()
            while True:
                await anyio.sleep(self._retry)
                if await self._try():
                    last_renewal = self._clock()
                    continue
                if self._clock() - last_renewal >= self._renew_deadline or not self._still_ours():
                    log.warning("leadership lost", identity=self.identity, lease=self.name)
                    tg.cancel_scope.cancel()
                    break
        self._set_leading(False)

    def _still_ours(self) -> bool:
        """False once a read showed someone else holding the Lease."""
        return self._observed is None or self._observed[0] == self.identity

    async def _try(self) -> bool:
        """One acquire-or-renew attempt; True when this replica holds the Lease afterwards."""
        try:
            with anyio.fail_after(self._timeout):
                return await self._try_once()
        except ApiException as exc:
            if exc.status != 409:
                self._on_error()
                log.warning("lease update failed", status=exc.status, error=exc.reason)
            return False
        except Exception as exc:
            self._on_error()
            log.warning("lease update failed", error=f"{type(exc).__name__}: {exc}")
            return False

    async def _try_once(self) -> bool:
        now = micro_time()
        try:
            lease = await call_json(
                self._coordination.read_namespaced_lease, self.name, self.namespace
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(now, now, 0),
            }
            await call_json(self._coordination.create_namespaced_lease, self.namespace, body)
            self._observe((self.identity, now))
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"))
        self._observe(record)
        duration = spec.get("leaseDurationSeconds") or self._duration
        if holder and holder != self.identity and self._clock() - self._observed_at < duration:
            return False  # held by someone else and not expired
        transitions = int(spec.get("leaseTransitions") or 0)
        acquired = spec.get("acquireTime") if holder == self.identity else now
        if holder != self.identity:
            transitions += 1
        lease["spec"] = self._spec(acquired or now, now, transitions)
        await call_json(
            self._coordination.replace_namespaced_lease, self.name, self.namespace, lease
        )
        self._observe((self.identity, now))
        return True

    def _spec(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self._duration)),
            "acquireTime": acquired,
            "renewTime": renewed,
            "leaseTransitions": transitions,
        }

    def _observe(self, record: tuple[Any, ...]) -> None:
        if record != self._observed:
            self._observed = record
            self._observed_at = self._clock()

    async def _release(self) -> None:
        try:
            lease = await call_json(
                self._coordination.read_namespaced_lease, self.name, self.namespace
            )
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=micro_time())
            await call_json(
                self._coordination.replace_namespaced_lease, self.name, self.namespace, lease
            )
            log.info("lease released", identity=self.identity, lease=self.name)
        except Exception as exc:
            log.warning("lease release failed", error=f"{type(exc).__name__}: {exc}")
