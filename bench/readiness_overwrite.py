"""Scheduler pod readiness while InterLink's virtual kubelet keeps overwriting it.

``.venv/bin/python bench/readiness_overwrite.py [--seconds 60] [--interval 1 --interval 5]``

Starts its own control plane (tests/kube.py), one DaskCluster made the way the operator makes it
(its scheduler pod on the virtual node), the fake virtual kubelet
(``tests/fakes/virtual_kubelet.py``: conditions replaced by ``[Ready]`` on every status loop,
``interval`` seconds apart), a forwarder pod object and the reconciler in-process; then creates
the Tunnel and watches the scheduler pod for ``--seconds``. For each virtual kubelet interval it
prints:

- Tunnel -> endpoint: from the Tunnel's creation to the reconciler's EndpointSlice carrying a
  ready endpoint (slices listed every 20 ms), and Tunnel -> kr8s-ready (first pod version with
  Ready and ContainersReady True, as ``KubeCluster`` waits for it);
- ready fraction: the share of the watched time (from the first kr8s-ready on) during which the
  pod, as the API server had it, read Ready and ContainersReady True: what a poller such as
  kr8s sees at a random moment;
- re-assertion latency p50/max: from each pod version without ContainersReady (a virtual kubelet
  write) to the next one with it (the reconciler's patch), both as the same watch saw them;
- after the Tunnel is deleted: how many pod versions still read kr8s-ready over five more
  virtual kubelet loops (must be 0).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from kubernetes_asyncio import client, watch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemons.reconciler import readiness
from daemons.reconciler.kube import call_json
from tests.fakes.virtual_kubelet import running_virtual_kubelet
from tests.kube import KubeAPIServer
from tests.test_reconciler_kube import (
    VIRTUAL_NODE,
    World,
    admin_client,
    apply_crds,
    running,
)


async def poll(predicate: Callable[[], Awaitable[float | None]], seconds: float = 60) -> float:
    """The first non-None value of ``predicate``, polled every 20 ms (the resolution)."""
    with anyio.fail_after(seconds):
        while True:
            value = await predicate()
            if value is not None:
                return value
            await anyio.sleep(0.02)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


class PodTimeline:
    """(monotonic time, kr8s-ready) for every version of one pod a watch delivers."""

    def __init__(self) -> None:
        self.points: list[tuple[float, bool]] = []

    async def follow(self, api: client.ApiClient, ns: str, name: str) -> None:
        core = client.CoreV1Api(api)
        while True:
            async with watch.Watch() as stream:
                async for event in stream.stream(
                    core.list_namespaced_pod,
                    ns,
                    field_selector=f"metadata.name={name}",
                    timeout_seconds=300,
                ):
                    pod: Any = event["raw_object"]
                    self.points.append((time.monotonic(), readiness.is_ready(pod)))

    def first_ready(self, since: float) -> float | None:
        return next((t for t, ready in self.points if t >= since and ready), None)

    def fraction(self, start: float, end: float) -> float:
        """Share of [start, end] during which the last version seen read ready."""
        ready_time, state, last = 0.0, False, start
        for t, ready in self.points:
            if t <= start:
                state = ready
                continue
            if t >= end:
                break
            if state:
                ready_time += t - last
            state, last = ready, t
        if state:
            ready_time += end - last
        return ready_time / (end - start)

    def reassertions(self, start: float, end: float) -> list[float]:
        """Seconds from each not-ready version to the next ready one, within [start, end]."""
        out, lost = [], None
        for t, ready in self.points:
            if t < start or t > end:
                continue
            if not ready and lost is None:
                lost = t
            elif ready and lost is not None:
                out.append(t - lost)
                lost = None
        return out


async def one_run(kube: KubeAPIServer, interval: float, seconds: float) -> str:
    base = f"bench-{uuid.uuid4().hex[:6]}"
    users, fwd = f"{base}-users", f"{base}-jobtunnel"
    async with await admin_client(kube) as api:
        core = client.CoreV1Api(api)
        for ns in (users, fwd):
            await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        try:
            async with (
                running_virtual_kubelet(api, [users], VIRTUAL_NODE, interval=interval) as vk,
                anyio.create_task_group() as tg,
            ):
                world = World(api, users, fwd, vk)
                forwarder = await world.forwarder_pod()
                await world.dask_cluster("bench", "alice")
                pod_name = await world.scheduler_pod_name("bench")
                pod = await call_json(core.read_namespaced_pod, pod_name, users)
                timeline = PodTimeline()
                tg.start_soon(timeline.follow, api, users, pod_name)
                async with running(world.settings(), kube) as reconciler:
                    created = time.monotonic()
                    await world.tunnel("t-bench", "alice", pod, forwarder)

                    async def endpoint() -> float | None:
                        ours = await world.our_slice("bench")
                        ends = (ours or {}).get("endpoints") or []
                        ready = bool(ends and ends[0]["conditions"].get("ready"))
                        return time.monotonic() if ready else None

                    async def first_ready() -> float | None:
                        return timeline.first_ready(created)

                    async def unrouted() -> float | None:
                        return time.monotonic() if await world.our_slice("bench") is None else None

                    endpoint_at = await poll(endpoint)
                    ready_at = await poll(first_ready)
                    await anyio.sleep(seconds)  # the observation window itself
                    end = time.monotonic()
                    await world.delete_tunnel("t-bench")
                    gone = await poll(unrouted)
                    await vk.next_loops(5, timeout=60 + 10 * interval)
                    after = [r for t, r in timeline.points if t > gone and r]
                    writes = reconciler.metrics.readiness_writes.labels(ready="true")._value.get()
                tg.cancel_scope.cancel()
        finally:
            for ns in (users, fwd):
                await core.delete_namespace(ns)
    lat = timeline.reassertions(ready_at, end)
    lat_ms = [x * 1000 for x in lat] or [float("nan")]
    window = [p for p in vk.writes if ready_at <= p[0] <= end]
    return (
        f"vk interval {interval:g} s, {seconds:g} s watched: "
        f"Tunnel -> endpoint {1000 * (endpoint_at - created):.0f} ms, "
        f"-> kr8s-ready {1000 * (ready_at - created):.0f} ms; "
        f"ready fraction {100 * timeline.fraction(ready_at, end):.2f}% "
        f"({len(window)} overwrites, {vk.conflicts} vk conflicts, {writes:.0f} re-assertions); "
        f"re-assertion p50 {percentile(lat_ms, 0.5):.0f} ms max {max(lat_ms):.0f} ms "
        f"(n={len(lat)}); kr8s-ready versions after the Tunnel went: {len(after)}"
    )


async def run(kube: KubeAPIServer, intervals: list[float], seconds: float) -> None:
    for interval in intervals:
        print(await one_run(kube, interval, seconds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="watched time per run")
    parser.add_argument(
        "--interval",
        type=float,
        action="append",
        help="virtual kubelet status loop period, s (repeatable; default 1 and 5)",
    )
    args = parser.parse_args()
    with KubeAPIServer() as kube:
        apply_crds(kube)
        anyio.run(run, kube, args.interval or [1.0, 5.0], args.seconds, backend="asyncio")


if __name__ == "__main__":
    main()
