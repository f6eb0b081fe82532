"""Time from Tunnel creation to routed Service, against a real kube-apiserver.

``.venv/bin/python bench/reconcile_latency.py [-n 50]``

Starts its own control plane (tests/kube.py: etcd, kube-apiserver, kube-controller-manager; the
binaries come from ``scripts/setup-kube``), applies the Tunnel and Dask CRDs, creates ``n``
DaskClusters the way the operator would, runs the reconciler in-process and creates one Tunnel
per cluster: once one at a time (each waited for), once all back to back. Prints p50/p90/max.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import anyio
from kubernetes_asyncio import client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kube import KubeAPIServer
from tests.test_reconciler_kube import (
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
            ns = f"bench-{uuid.uuid4().hex[:6]}"
            await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
            try:
                latencies = await measure_latency(World(api, ns), kube, n, burst=burst)
            finally:
                await core.delete_namespace(ns)
        mode = "burst" if burst else "one at a time"
        print(f"Tunnel created -> Service routed ({mode}): {summary(latencies)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=50, help="number of Tunnels (default 50)")
    args = parser.parse_args()
    with KubeAPIServer() as kube:
        apply_crds(kube)
        anyio.run(run, kube, args.n, backend="asyncio")


if __name__ == "__main__":
    main()
