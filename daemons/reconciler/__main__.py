"""``jobtunnel-reconciler``: wires settings, logging, the Kubernetes client, HTCondor and metrics.

A thin composition root: everything with behaviour lives in :class:`Reconciler`, which tests
run in-process with their own ApiClient and a fake schedd.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config

from daemons.reconciler.controller import Reconciler
from daemons.reconciler.jobs import ScheddLike, htcondor_schedd_factory
from daemons.reconciler.settings import ReconcilerSettings
from shared import logs
from shared.daemon import load_settings, stop_requested
from shared.metrics import new_registry, serve_http

log = logs.get_logger("jobtunnel.reconciler")


async def api_client(settings: ReconcilerSettings) -> client.ApiClient:
    """From KUBECONFIG when set, else the pod's service account (in-cluster config)."""
    configuration = client.Configuration()
    if settings.kubeconfig is not None:
        await kube_config.load_kube_config(
            config_file=str(settings.kubeconfig), client_configuration=configuration
        )
    else:
        kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return client.ApiClient(configuration)


def schedd_factory(settings: ReconcilerSettings) -> Callable[[str], ScheddLike] | None:
    if settings.htcondor_collector is None:
        return None
    return htcondor_schedd_factory(
        settings.htcondor_collector,
        token_file=settings.htcondor_token_file,
        scitoken_file=settings.htcondor_scitoken_file,
    )


async def serve(settings: ReconcilerSettings) -> int:
    registry = new_registry()
    async with await api_client(settings) as api:
        reconciler = Reconciler(
            settings, api=api, schedd_factory=schedd_factory(settings), registry=registry
        )
        async with (
            serve_http(
                settings.http, registry, ready_checks={"watches": reconciler.ready_check}
            ) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(reconciler.run)
            log.info(
                "started",
                http=str(http),
                identity=reconciler.identity,
                namespace=settings.namespace,
                job_checks=settings.htcondor_collector is not None,
            )
            await stop_requested(log)
            # Cancelling releases the Lease (shielded, bounded) so a standby takes over at once.
            tg.cancel_scope.cancel()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jobtunnel-reconciler",
        description="Routes Dask scheduler Services to published jobtunnel sessions.",
    )
    parser.add_argument("--config", type=Path, help="TOML file; environment variables override it")
    args = parser.parse_args(argv)
    settings = load_settings("jobtunnel-reconciler", ReconcilerSettings, args.config)
    sys.exit(anyio.run(serve, settings, backend="asyncio"))


if __name__ == "__main__":
    main()
