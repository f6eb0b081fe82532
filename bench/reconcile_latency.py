"""Time from Tunnel creation to a ready endpoint (the reconciler's EndpointSlice), real apiserver.

``.venv/bin/python bench/reconcile_latency.py [-n 50]``

Starts its own control plane (tests/kube.py: etcd, kube-apiserver, kube-controller-manager; the
binaries come from ``scripts/setup-kube``), applies the Tunnel and Dask CRDs, creates ``n``
DaskClusters the way the operator would, runs the reconciler in-process and creates one Tunnel
per cluster: once one at a time (each waited for), once all back to back. Prints p50/p90/max.
The forwarder and its Tunnels live in a namespace of their own, the clusters in another, and the
fake virtual kubelet (tests/fakes/virtual_kubelet.py) rewrites the scheduler pods' status every
5 s throughout, as InterLink's does.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import anyio
from kubernetes_asyncio import client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.virtual_kubelet import running_virtual_kubelet
from tests.kube import KubeAPIServer
from tests.test_reconciler_kube import (
    VIRTUAL_NODE,
    World,
    admin_client,
    apply_crds,
    measure_latency,
    summary,
)


async def run(kube: KubeAPIServer, n: int) -> None:
    for burst in (False, True):
        async with await admin_client(kube) as api:
            core = client.CoreV1Api(api)
            base = f"bench-{uuid.uuid4().hex[:6]}"
            names = (f"{base}-users", f"{base}-jobtunnel")
            for ns in names:
                await core.create_namespace(
                    client.V1Namespace(metadata=client.V1ObjectMeta(name=ns))
                )
            try:
                async with running_virtual_kubelet(
                    api, [names[0]], VIRTUAL_NODE, interval=5.0
                ) as vk:
                    world = World(api, names[0], names[1], vk)
                    latencies = await measure_latency(world, kube, n, burst=burst)
            finally:
                for ns in names:
                    await core.delete_namespace(ns)
        mode = "burst" if burst else "one at a time"
        print(f"Tunnel created -> ready endpoint ({mode}): {summary(latencies)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="number of Tunnels (default 50)")
    args = parser.parse_args()
    with KubeAPIServer() as kube:
        apply_crds(kube)
        anyio.run(run, kube, args.n, backend="asyncio")


if __name__ == "__main__":
    main()
