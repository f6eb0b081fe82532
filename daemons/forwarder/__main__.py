"""``jobtunnel-forwarder``: wires settings, logging, metrics, auth and the SSH server."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from prometheus_client import CollectorRegistry

from daemons.forwarder.metrics import ForwarderMetrics
from daemons.forwarder.server import Forwarder
from daemons.forwarder.sessions import MemoryPublisher, Publisher
from daemons.forwarder.settings import ForwarderSettings
from shared import hostkeys, logs
from shared.auth import (
    Authenticator,
    FailureLimiter,
    HubVerifier,
    TokenFileVerifier,
    TokenVerifier,
)
from shared.config import HostPort
from shared.daemon import ListenError, leaves, load_settings, stop_requested
from shared.metrics import new_registry, serve_http, serve_json

log = logs.get_logger("jobtunnel.forwarder")


def build_verifier(settings: ForwarderSettings, registry: CollectorRegistry) -> TokenVerifier:
    if settings.auth == "hub":
        assert settings.hub_api_url is not None
        return HubVerifier(
            settings.hub_api_url,
            ca_bundle=settings.hub_ca_bundle,
            verify_tls=settings.hub_verify_tls,
            timeout=settings.hub_timeout,
            cache_ttl=settings.auth_cache_ttl,
            negative_cache_ttl=settings.auth_negative_cache_ttl,
            required_scopes=settings.hub_required_scopes,
            allow_broad_tokens=settings.hub_allow_broad_tokens,
            registry=registry,
        )
    assert settings.token_file is not None
    return TokenFileVerifier(settings.token_file)


async def build_publisher(
    settings: ForwarderSettings, registry: CollectorRegistry, stack: contextlib.AsyncExitStack
) -> Publisher:
    if settings.publish != "kubernetes":
        return MemoryPublisher()
    from daemons.forwarder import kube  # kubernetes_asyncio only when asked for

    assert settings.namespace
    assert settings.pod_name
    assert settings.pod_ip
    api = await stack.enter_async_context(await kube.create_api_client())
    return kube.KubernetesPublisher(
        api,
        namespace=settings.namespace,
        pod_name=settings.pod_name,
        pod_ip=settings.pod_ip,
        heartbeat_interval=settings.tunnel_heartbeat_interval,
        registry=registry,
    )


def effective(settings: ForwarderSettings) -> ForwarderSettings:
    """In Kubernetes the listeners are advertised on the pod IP unless told otherwise."""
    if settings.publish == "kubernetes" and settings.advertise_host is None:
        return dataclasses.replace(settings, advertise_host=settings.pod_ip)
    return settings


def build_forwarder(
    settings: ForwarderSettings,
    registry: CollectorRegistry,
    *,
    verifier: TokenVerifier,
    publisher: Publisher,
) -> Forwarder:
    """The forwarder with its host key, front door and metrics; shared with the tests."""
    limiter = FailureLimiter(
        max_failures=settings.auth_max_failures, window=settings.auth_failure_window
    )
    return Forwarder(
        settings,
        host_key=hostkeys.load_or_generate(settings.host_key),
        authenticator=Authenticator(verifier, limiter, registry=registry),
        publisher=publisher,
        metrics=ForwarderMetrics(registry, port_capacity=len(settings.port_range)),
    )


@contextlib.asynccontextmanager
async def serve_forwarder_http(
    forwarder: Forwarder, registry: CollectorRegistry
) -> AsyncIterator[tuple[HostPort, HostPort | None]]:
    """``/metrics`` and the probes on ``http``; ``/tunnels`` apart, on ``admin_http``.

    ``/tunnels`` lists every user, job, private IP and listener: it is the interface of the
    standalone mode only, and binds loopback by default. With Kubernetes publishing the
    Tunnel objects are the interface (RBAC decides who reads them), so it is not served.
    Yields the bound addresses (``None``: no admin listener).
    """
    settings = forwarder.settings
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            serve_http(settings.http, registry, ready_checks={"forwarder": forwarder.ready_check})
        )
        admin = None
        if settings.publish == "memory":
            admin = await stack.enter_async_context(
                serve_json(settings.admin_http, {"/tunnels": forwarder.tunnels})
            )
        yield http, admin


async def serve(settings: ForwarderSettings) -> int:
    settings = effective(settings)
    registry = new_registry()
    verifier = build_verifier(settings, registry)
    stack = contextlib.AsyncExitStack()
    try:
        publisher = await build_publisher(settings, registry, stack)
    except Exception as exc:  # kube.KubeConfigError; the module may not even be importable
        log.error("cannot publish to kubernetes", error=str(exc))
        return 2
    try:
        forwarder = build_forwarder(settings, registry, verifier=verifier, publisher=publisher)
    except hostkeys.HostKeyError as exc:
        log.error("host key refused", error=str(exc))
        return 2
    unbound: list[BaseException] = []
    try:
        async with (
            stack,
            serve_forwarder_http(forwarder, registry) as (http, admin),
            anyio.create_task_group() as tg,
        ):
            ssh = await tg.start(forwarder.run)
            log.info(
                "ready",
                ssh=str(ssh),
                http=str(http),
                admin_http=str(admin) if admin else None,
                host_key_fingerprint=hostkeys.fingerprint(forwarder.host_key),
                auth=settings.auth,
                publish=settings.publish,
            )
            await stop_requested(log)
            with anyio.move_on_after(settings.drain_timeout + 5):
                await forwarder.drain()
            tg.cancel_scope.cancel()
    except* ListenError as group:
        unbound.extend(leaves(group))
    finally:
        aclose = getattr(verifier, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
    for failure in unbound:
        log.error("stopped: cannot listen", error=str(failure))
    if unbound:
        return 1
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="jobtunnel-forwarder",
        description="SSH server exposing jobtunnel agents' services (see README).",
    )
    parser.add_argument("--config", type=Path, help="TOML file; JOBTUNNEL_* variables override it")
    args = parser.parse_args(argv)
    settings = load_settings("jobtunnel-forwarder", ForwarderSettings, args.config)
    sys.exit(anyio.run(serve, settings, backend="asyncio"))


if __name__ == "__main__":
    main()
