"""The daemons' small HTTP face: ``/metrics``, ``/healthz``, ``/readyz``, and JSON routes.

Liveness and readiness are separate on purpose: ``/healthz`` only says the
event loop answers (a restart would help), ``/readyz`` says whether the daemon
can do its job now (a hub down, a connection not up) so that Kubernetes stops
sending it work without killing it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.config import HostPort
from shared.daemon import ListenError

# A readiness check returns None when fine, else the reason it is not ready.
ReadyCheck = Callable[[], str | None]
JsonRoute = Callable[[], object]


def new_registry() -> CollectorRegistry:
    """A private registry per daemon instance, so tests can run many side by side."""
    return CollectorRegistry(auto_describe=True)


def build_app(
    registry: CollectorRegistry,
    *,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
    json_routes: Mapping[str, JsonRoute] | None = None,
) -> web.Application:
    checks = dict(ready_checks or {})

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        failing = {name: reason for name, check in checks.items() if (reason := check())}
        if failing:
            text = "".join(f"{name}: {reason}\n" for name, reason in sorted(failing.items()))
            return web.Response(status=503, text=text)
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for route, producer in (json_routes or {}).items():
        app.router.add_get(route, _json_handler(producer))
    return app


def _json_handler(producer: JsonRoute) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(producer(), indent=1, sort_keys=True) + "\n",
            content_type="application/json",
        )

    return handler


@asynccontextmanager
async def serve_http(
    address: HostPort,
    registry: CollectorRegistry,
    *,
    ready_checks: Mapping[str, ReadyCheck] | None = None,
    json_routes: Mapping[str, JsonRoute] | None = None,
) -> AsyncIterator[HostPort]:
    """Serve the app while the block runs; yields the bound address (port 0 resolved)."""
    app = build_app(registry, ready_checks=ready_checks, json_routes=json_routes)
    async with _serve(app, address) as bound:
        yield bound


@asynccontextmanager
async def serve_json(address: HostPort, routes: Mapping[str, JsonRoute]) -> AsyncIterator[HostPort]:
    """Only ``routes``, e.g. an admin listener apart from the metrics one."""
    app = web.Application()
    for route, producer in routes.items():
        app.router.add_get(route, _json_handler(producer))
    async with _serve(app, address) as bound:
        yield bound


@asynccontextmanager
async def _serve(app: web.Application, address: HostPort) -> AsyncIterator[HostPort]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError("HTTP", address, exc) from None
        server = site._server  # aiohttp keeps the asyncio.Server here
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else address.port
        yield HostPort(address.host, port)
    finally:
        await runner.cleanup()
