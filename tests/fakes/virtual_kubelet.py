"""A fake of InterLink's virtual kubelet's pod status writer, which cannot run here.

The real one needs the interLink API and an HTCondor plugin behind it. What the reconciler has
to live with is only how it writes pod status, modelled here on interLink's
``pkg/virtualkubelet`` (``checkPodsStatus`` in execute.go and the provider's ``UpdatePod``,
driven by virtual-kubelet's pod controller): for every pod bound to its node it keeps a status of
its own and, on **every** status loop, writes that status back whole with UpdateStatus (``PUT
pods/<name>/status``, not a patch):

- ``phase: Running`` once the job runs (here: at once);
- ``podIP: 127.0.0.1`` (its default: the job's real address is nowhere in Kubernetes);
- ``conditions`` replaced by the single ``Ready=True`` it knows about.

So whatever another writer put into ``status.conditions`` -- ``ContainersReady`` above all -- is
gone after the next loop. A write that conflicts (409: the pod changed between its read and its
write) is dropped until the next loop, as the real one logs and moves on.

What a test can look at: :attr:`FakeVirtualKubelet.writes` (monotonic time, namespace, name of
each status write that landed) and :attr:`FakeVirtualKubelet.conflicts`. Pods are found by
``spec.nodeName`` in the given namespaces (deleting or finished pods are left alone); stopped by
cancelling (:func:`running_virtual_kubelet` does it on exit).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from daemons.reconciler.kube import call_json

#: InterLink's default pod IP for an offloaded pod.
LOOPBACK = "127.0.0.1"


@dataclass
class FakeVirtualKubelet:
    """Overwrites the status of every pod on ``node`` each ``interval`` seconds (see module)."""

    api: client.ApiClient
    namespaces: Sequence[str]
    node: str
    interval: float = 1.0
    pod_ip: str = LOOPBACK
    writes: list[tuple[float, str, str]] = field(default_factory=list)
    conflicts: int = 0
    #: Loops that failed (API server unreachable...): recorded, the loop goes on.
    errors: list[str] = field(default_factory=list)
    loops: int = 0
    _looped: anyio.Event = field(default_factory=anyio.Event)

    def status_for(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The status it writes: its own view, whatever the pod carries now."""
        status = pod.get("status") or {}
        start = status.get("startTime") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "phase": "Running",
            "hostIP": status.get("hostIP") or self.pod_ip,
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": start,
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": start}],
        }

    async def loop_once(self) -> None:
        core = client.CoreV1Api(self.api)
        for ns in self.namespaces:
            try:
                listed = await call_json(
                    core.list_namespaced_pod, ns, field_selector=f"spec.nodeName={self.node}"
                )
                pods = listed.get("items") or []
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            for pod in pods:
                meta = pod.get("metadata") or {}
                phase = (pod.get("status") or {}).get("phase")
                if meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
                    continue
                body = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": meta,
                    "spec": pod.get("spec"),
                    "status": self.status_for(pod),
                }
                try:
                    await call_json(core.replace_namespaced_pod_status, meta["name"], ns, body)
                except ApiException as exc:
                    if exc.status == 409:
                        self.conflicts += 1
                        continue
                    if exc.status == 404:
                        continue
                    raise
                self.writes.append((time.monotonic(), ns, str(meta["name"])))
        self.loops += 1
        looped, self._looped = self._looped, anyio.Event()
        looped.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        await self.loop_once()
        task_status.started()
        while True:
            await anyio.sleep(self.interval)  # the status loop's period, not synchronisation
            try:
                await self.loop_once()
            except Exception as exc:  # an API server restart: the real one logs and loops on
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    async def next_loops(self, n: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``n`` more loops have completed (a deadline, not a sleep)."""
        target = self.loops + n
        with anyio.fail_after(timeout):
            while self.loops < target:
                await self._looped.wait()


@contextlib.asynccontextmanager
async def running_virtual_kubelet(
    api: client.ApiClient, namespaces: Sequence[str], node: str, **options: Any
) -> AsyncIterator[FakeVirtualKubelet]:
    """A :class:`FakeVirtualKubelet` looping until the block ends."""
    vk = FakeVirtualKubelet(api, list(namespaces), node, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(vk.run)
        try:
            yield vk
        finally:
            tg.cancel_scope.cancel()
