"""A fake kube-proxy: stands in for kube-proxy, which cannot run here, for one Service.

Real kube-proxy programs iptables/IPVS on every node so that a connection to a Service's
ClusterIP and port lands on one of the Service's *ready* endpoints. Since Kubernetes 1.19 it
reads them from EndpointSlices: every slice labelled ``kubernetes.io/service-name: <service>``,
whoever manages it, merged; a slice port is matched to the Service port by *name*, and its
number is the port dialled. None of the packet plumbing can run on a test machine (no node, no
ClusterIP range, no DNS); the test control plane still runs the real endpoint and EndpointSlice
controllers (kube-controller-manager) beside the reconciler's own slice, so the slices are the
real thing.

:class:`FakeKubeProxy` keeps that part real and fakes only the packets:

- it listens on ``host`` (a loopback alias such as ``127.77.1.2``: all of 127/8 is on ``lo``;
  the test maps the Service's DNS names to it, e.g. in a private ``/etc/hosts``) at each TCP
  port of the Service's ``spec.ports`` (the Service *port*, e.g. 8787, not the targetPort);
- for **each** accepted connection it reads the Service and its EndpointSlices from the API
  afresh (so it always follows what Kubernetes has *now*, with no watch to fall behind),
  merges the slices of the Service by name label, takes the slice port of the same port name
  and the endpoints whose ``conditions.ready`` is not false (absent means ready, as in the
  API), picks one round-robin, and relays bytes both ways until both sides are done; with no
  ready endpoint the connection is closed at once (kube-proxy rejects);
- **loopback endpoints are skipped**: InterLink's virtual kubelet reports 127.0.0.1 as the
  offloaded scheduler pod's IP, and the EndpointSlice controller publishes it because the
  Service still selects that pod. Current API servers refuse loopback slice addresses
  (``ValidateEndpointIP`` in the discovery validation; the controller then writes nothing and
  warns with an Event on the Service), so a real cluster never routes to it; the 1.20 test
  apiserver validates only the address syntax, so this fake drops what a current API server
  would have refused;
- **address translation**: an endpoint address is a pod IP (e.g. the forwarder pod's fake IP
  ``10.245.0.2``: API validation rejects loopback addresses), which routes nowhere on this
  machine, while the forwarder under test runs in the test process and binds its listeners on
  127.0.0.1. ``translate`` maps the pod IPs that have something behind them here to the address
  to dial (``{forwarder_pod_ip: "127.0.0.1"}``), keeping the slice port. A pod IP not in it
  is unreachable, as it would be in a cluster: the connection is closed and the attempt recorded
  in :attr:`FakeKubeProxy.errors`. Each connection records the endpoint it stood for
  (:attr:`Connection.endpoint`).

What a test can look at: :attr:`FakeKubeProxy.connections` (per connection: the Service port
dialled, the endpoint chosen, the first line the client sent and the first line the backend
answered -- for HTTP, the request line and the status line; only the first request of a
connection is seen) and :attr:`FakeKubeProxy.errors`. Bounded: at most ``max_connections``
relayed at once (more are closed), each at most ``max_lifetime`` seconds; stopped by cancelling
(:func:`running_kube_proxy` does it on exit).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.abc import ByteStream, SocketStream
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from daemons.reconciler.kube import call_json
from daemons.reconciler.route import (
    DISCOVERY_GROUP,
    SERVICE_NAME_LABEL,
    SLICE_PLURAL,
    choose_version,
)

#: What a relay may raise when a peer goes away; it ends that relay only.
_GONE = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


@dataclass
class Connection:
    """One connection accepted on a Service port."""

    port: int
    #: ``"ip:port"`` from the EndpointSlices (before translation), or None if none was ready.
    endpoint: str | None = None
    #: First line the client sent / the backend answered (HTTP: request line / status line).
    request: bytes = b""
    reply: bytes = b""
    #: Whether the endpoint was dialled successfully; whether the connection is over.
    relayed: bool = False
    done: bool = False


def _first_line(chunk: bytes) -> bytes:
    return chunk.split(b"\r\n", 1)[0][:200]


@dataclass
class FakeKubeProxy:
    """Relays ``host:<Service port>`` to the Service's ready slice endpoints (see module)."""

    api: client.ApiClient
    namespace: str
    service: str
    host: str
    #: Pod IP -> the address to dial for it (see the module); other pod IPs are unreachable.
    translate: Mapping[str, str] = field(default_factory=dict)
    max_connections: int = 32
    max_lifetime: float = 120.0
    connect_timeout: float = 5.0
    connections: list[Connection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: The Service ports listened on (set once listening).
    ports: list[int] = field(default_factory=list)
    _rr: itertools.count[int] = field(default_factory=itertools.count)
    _version: str | None = None

    def requests(self, port: int) -> list[tuple[str, str]]:
        """(request line, status line) of each finished connection on ``port`` that spoke HTTP."""
        return [
            (c.request.decode(errors="replace"), c.reply.decode(errors="replace"))
            for c in self.connections
            if c.port == port and c.done and c.reply.startswith(b"HTTP/")
        ]

    def count(self, port: int) -> int:
        """Connections on ``port`` relayed to an endpoint so far."""
        return sum(1 for c in self.connections if c.port == port and c.relayed)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        core = client.CoreV1Api(self.api)
        service = await core.read_namespaced_service(self.service, self.namespace)
        ports = [p.port for p in service.spec.ports if (p.protocol or "TCP") == "TCP"]
        limiter = anyio.CapacityLimiter(self.max_connections)
        async with contextlib.AsyncExitStack() as stack:
            listeners = []
            for port in ports:
                listener = await anyio.create_tcp_listener(local_host=self.host, local_port=port)
                listeners.append(await stack.enter_async_context(listener))
            self.ports = ports
            async with anyio.create_task_group() as tg:
                for port, listener in zip(ports, listeners, strict=True):
                    tg.start_soon(listener.serve, self._handler(port, limiter), tg)
                task_status.started()

    def _handler(self, port: int, limiter: anyio.CapacityLimiter) -> Any:
        async def handle(stream: SocketStream) -> None:
            conn = Connection(port)
            self.connections.append(conn)
            async with stream:
                try:
                    limiter.acquire_nowait()
                except anyio.WouldBlock:
                    self.errors.append(f"port {port}: over {self.max_connections} connections")
                    return
                try:
                    with anyio.move_on_after(self.max_lifetime):
                        await self._relay(stream, conn)
                except Exception as exc:  # one connection's failure: recorded, never the proxy's
                    self.errors.append(f"port {port}: {type(exc).__name__}: {exc}")
                finally:
                    limiter.release()
                    conn.done = True

        return handle

    async def _endpoint(self, port: int) -> tuple[str, int] | None:
        """A ready (address, slice port) for Service port ``port``, as Kubernetes has it now."""
        core = client.CoreV1Api(self.api)
        try:
            service = await core.read_namespaced_service(self.service, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        names = [p.name for p in service.spec.ports if p.port == port]
        if not names:
            return None
        candidates = []
        for item in await self.slices():
            # A one-port Service's slice port may be nameless.
            slice_ports = [
                p["port"]
                for p in item.get("ports") or []
                if (p.get("name") or None) in (names[0], None)
            ]
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    if ipaddress.ip_address(address).is_loopback:
                        continue  # see the module: refused by current API servers
                    candidates += [(str(address), slice_port) for slice_port in slice_ports]
        if not candidates:
            return None
        return candidates[next(self._rr) % len(candidates)]

    async def slices(self) -> list[dict[str, Any]]:
        """Every EndpointSlice of the Service (by its name label), whoever manages it."""
        custom = client.CustomObjectsApi(self.api)
        if self._version is None:
            group = await call_json(client.DiscoveryApi(self.api).get_api_group)
            self._version = choose_version(group)
        listed = await call_json(
            custom.list_namespaced_custom_object,
            DISCOVERY_GROUP,
            self._version,
            self.namespace,
            SLICE_PLURAL,
            label_selector=f"{SERVICE_NAME_LABEL}={self.service}",
        )
        return list(listed.get("items") or [])

    async def _relay(self, stream: SocketStream, conn: Connection) -> None:
        endpoint = await self._endpoint(conn.port)
        if endpoint is None:
            return  # kube-proxy rejects a Service with no ready endpoint
        ip, target = endpoint
        conn.endpoint = f"{ip}:{target}"
        if ip not in self.translate:
            self.errors.append(f"port {conn.port}: endpoint {conn.endpoint} is unreachable here")
            return
        try:
            with anyio.fail_after(self.connect_timeout):
                backend = await anyio.connect_tcp(self.translate[ip], target)
        except (OSError, TimeoutError) as exc:
            self.errors.append(f"port {conn.port}: dialling {conn.endpoint}: {exc}")
            return
        conn.relayed = True
        async with backend, anyio.create_task_group() as tg:

            async def one_way(src: ByteStream, dst: ByteStream, first: str) -> None:
                try:
                    async for chunk in src:
                        if first and not getattr(conn, first):
                            setattr(conn, first, _first_line(chunk))
                        await dst.send(chunk)
                    with contextlib.suppress(*_GONE):
                        await dst.send_eof()
                except _GONE:
                    tg.cancel_scope.cancel()

            tg.start_soon(one_way, stream, backend, "request")
            tg.start_soon(one_way, backend, stream, "reply")


@contextlib.asynccontextmanager
async def running_kube_proxy(
    api: client.ApiClient,
    namespace: str,
    service: str,
    host: str,
    translate: Mapping[str, str],
    **options: Any,
) -> AsyncIterator[FakeKubeProxy]:
    """A :class:`FakeKubeProxy` listening until the block ends."""
    proxy = FakeKubeProxy(api, namespace, service, host, translate, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.run)
        try:
            yield proxy
        finally:
            tg.cancel_scope.cancel()
