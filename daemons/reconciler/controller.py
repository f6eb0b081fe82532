"""The reconciler: watches in, one idempotent reconcile per Tunnel key, Kubernetes writes out.

Level-triggered, controller-runtime style. Watches (Tunnels and forwarder pods in the forwarder
namespace; Dask scheduler Pods and Services, our EndpointSlices, DaskClusters, DaskWorkerGroups
and worker Deployments cluster-wide)
only decide *which* Tunnel keys to look at again; every reconcile then reads the current objects
from the API server and converges them on what the Tunnel implies, so a missed, duplicated or
reordered event costs nothing, and a restart of the reconciler or the API server only costs a
relist. Everything the reconciler wrote is marked with the Tunnel's key (the EndpointSlices it
owns, annotations on the worker objects it changed), so a Tunnel that vanished while nobody
watched is still cleaned up: every marked object is enqueued under its Tunnel's key, and the
reconcile of a key whose Tunnel is gone undoes whatever still carries that key.

One reconcile of key ``ns/name``:

1. read the Tunnel; gone (or deleting): undo what carries the key, done;
2. verify the claims (:mod:`.verify`, the owner chain included); refused: undo, condition
   Verified=False, Events;
3. job state (:mod:`.jobstep`); ended: undo, Events with the reason, delete the Tunnel;
4. route the ``<cluster>-scheduler`` Service with an EndpointSlice of our own (:mod:`.route`;
   the Service itself is never written), the worker groups and worker Deployments
   (:mod:`.workers`), the scheduler pod's readiness (:mod:`.readiness`);
5. write the Tunnel's status conditions and, for each transition, an Event.

Only the Lease holder (:mod:`.leader`) runs reconciles, the job poller and resyncs; watches run
on every replica so a standby is ready to take over at once.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry

from daemons.reconciler import policy, readiness, route, sources, workers
from daemons.reconciler.events import EventRecorder, Ref
from daemons.reconciler.jobs import JobStateSource, ScheddLike
from daemons.reconciler.jobstep import JobPoller, JobVerdict
from daemons.reconciler.kube import (
    CLUSTER_LABEL,
    COMPONENT_LABEL,
    DASK_GROUP,
    DASK_VERSION,
    STRATEGIC_MERGE_PATCH,
    TUNNEL_GROUP,
    TUNNEL_PLURAL,
    TUNNEL_VERSION,
    Obj,
    annotations_of,
    call_json,
    get_or_none,
    key_of,
    labels_of,
    patch_json,
    retry_conflicts,
    rfc3339,
    split_key,
)
from daemons.reconciler.leader import LeaderElector
from daemons.reconciler.metrics import CONDITIONS, ReconcilerMetrics
from daemons.reconciler.queue import WorkQueue
from daemons.reconciler.settings import ReconcilerSettings
from daemons.reconciler.verify import (
    NodeRules,
    OwnerChain,
    UserRules,
    Verdict,
    claimed_pod,
    replica_set_name,
    scheduler_deployment_name,
    verify,
    verify_owner_chain,
)
from daemons.reconciler.watch import Informer

log = structlog.get_logger(__name__)

SYNC_LOG_INTERVAL = 10.0
GAUGE_INTERVAL = 5.0


def default_identity() -> str:
    """Pod name (HOSTNAME in a pod) plus a random suffix: unique even across restarts."""
    host = os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}-{secrets.token_hex(4)}"


def _refusal_note(tunnel: Obj, key: str, entry: Obj) -> tuple[str, str, bool]:
    """The DaskCluster Event (reason, message, warning) for one refusal the forwarder reported."""
    spec = tunnel.get("spec") or {}
    name = (tunnel.get("metadata") or {}).get("name")
    count = entry.get("count", 1)
    if key.startswith(sources.CLAIM_PREFIX):
        return (
            "IdentityClaimRefused",
            f"a session from {entry.get('address')} presented user {spec.get('user')}'s token "
            f"and claimed tunnel {name} while it was alive; refused ({count} time(s) so far). "
            "A duplicate of the job, or someone else has the token: if it is not yours, "
            "revoke the token",
            True,
        )
    return (
        "SourceRefused",
        f"{entry.get('address')} tried to reach user {spec.get('user')}'s tunnel {name} and "
        f"was refused ({count} connection(s) so far): it is none of the user's pods, the Dask "
        "operator's, or an extra allowed CIDR. If it is your client, check that kube-proxy "
        "preserves pod source addresses (docs/architecture.md)",
        True,
    )


@dataclass
class Outcome:
    """What one reconcile did, for the status and the Events."""

    verified: tuple[str, str, str] = ("Unknown", "", "")
    routed: tuple[str, str, str] = ("Unknown", "", "")
    job: JobVerdict | None = None
    cluster: str | None = None
    routed_service: str | None = None
    notes: list[tuple[str, str, bool]] = field(default_factory=list)  # DaskCluster events
    tunnel_notes: list[tuple[str, str, bool]] = field(default_factory=list)  # Tunnel events
    # Who may reach the tunnel (status.allowedSources): nobody beyond the forwarder's own
    # list until the claims verify.
    allowed_sources: list[str] = field(default_factory=list)


class Reconciler:
    """Runnable in-process: ``await task_group.start(reconciler.run)`` returns once synced.

    ``api`` is an open ``ApiClient`` the caller owns; ``schedd_factory`` (schedd name -> client)
    enables job checks (tests pass a fake; production builds it from the collector setting).
    """

    def __init__(
        self,
        settings: ReconcilerSettings,
        *,
        api: client.ApiClient,
        schedd_factory: Callable[[str], ScheddLike] | None = None,
        registry: CollectorRegistry | None = None,
        identity: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.api = api
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = ReconcilerMetrics(self.registry)
        self.identity = identity or settings.identity or default_identity()
        self._core = client.CoreV1Api(api)
        self._apps = client.AppsV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._net = client.NetworkingV1Api(api)
        self._timeout = settings.request_timeout
        self.users = UserRules(
            settings.user_namespace,
            settings.user_label,
            settings.user_annotation,
            settings.user_slug_scheme,
        )
        self.nodes = NodeRules(settings.virtual_node, tuple(settings.virtual_node_selector.items()))
        self.queue = WorkQueue()
        self.events = EventRecorder(
            api,
            instance=self.identity,
            on_error=lambda: self._error("event"),
            request_timeout=self._timeout,
        )
        source = (
            JobStateSource(
                schedd_factory, registry=self.registry, timeout=settings.job_query_timeout
            )
            if schedd_factory is not None
            else None
        )
        self.jobs = JobPoller(
            source,
            tunnels=lambda: list(self.tunnels.cache.values()),
            enqueue=self.queue.add,
            interval=settings.job_poll_interval,
            min_gap=min(1.0, settings.job_poll_interval),
            on_error=lambda: self._error("job"),
        )
        self.leader = LeaderElector(
            api,
            namespace=settings.namespace,
            name=settings.lease_name,
            identity=self.identity,
            lease_duration=settings.lease_duration,
            renew_deadline=settings.lease_renew_deadline,
            retry_period=settings.lease_retry_period,
            request_timeout=self._timeout,
            clock=clock,
            on_change=self._leadership_changed,
            on_error=lambda: self._error("lease"),
        )
        # Tunnel key -> (namespace, cluster) as last verified: maps cluster events to Tunnels.
        self._cluster_of: dict[str, tuple[str, str]] = {}
        self._tunnel_seen: dict[str, tuple[Any, ...]] = {}
        # UIDs of scheduler pods this replica made ready: a re-assertion after the virtual
        # kubelet's overwrite is not news (no Event).
        self._made_ready: set[str] = set()
        self.reconciles = 0
        timeout, to = settings.watch_timeout, self._timeout

        def informer(
            kind: str, func: Callable[..., Awaitable[Any]], handler: Any, sel: str | None = None
        ) -> Informer:
            return Informer(
                kind,
                func,
                handler,
                label_selector=sel,
                watch_timeout=timeout,
                request_timeout=to,
                on_error=self._error,
            )

        scheduler = f"{COMPONENT_LABEL}=scheduler"
        self.tunnels = informer(
            "Tunnel",
            functools.partial(
                self._custom.list_namespaced_custom_object,
                TUNNEL_GROUP,
                TUNNEL_VERSION,
                settings.namespace,
                TUNNEL_PLURAL,
            ),
            self._on_tunnel,
        )
        self.pods = informer("Pod", self._core.list_pod_for_all_namespaces, self._on_pod, scheduler)
        # Every pod, trimmed to owner labels and IPs: the allow-lists (:mod:`.sources`).
        self.source_pods = Informer(
            "Pod",
            self._core.list_pod_for_all_namespaces,
            self._on_source_pod,
            watch_timeout=timeout,
            request_timeout=to,
            on_error=self._error,
            transform=functools.partial(sources.trim_pod, annotation=settings.user_annotation),
        )
        self._source_seen: dict[str, tuple[Any, ...]] = {}
        self._source_owners: dict[str, list[str]] = {}
        self._pod_index = sources.PodIndex(self.users)
        self._owners = sources.OwnerIndex(self.users)
        self._policy_errors: dict[str, str] = {}
        self._policies_written: set[str] = set()
        self.services = informer(
            "Service", self._core.list_service_for_all_namespaces, self._on_marked, scheduler
        )
        # Chosen by discovery in run(), before any informer lists (v1 from Kubernetes 1.21).
        self.slice_version = "v1"

        async def list_slices(**kwargs: Any) -> Any:
            return await self._custom.list_cluster_custom_object(
                route.DISCOVERY_GROUP, self.slice_version, route.SLICE_PLURAL, **kwargs
            )

        self.slices = informer(
            "EndpointSlice", list_slices, self._on_marked, route.MANAGED_SELECTOR
        )
        # Forwarder pods (their IP and readiness are the endpoint): the forwarder namespace only.
        self.forwarders = informer(
            "Pod",
            functools.partial(self._core.list_namespaced_pod, settings.namespace),
            self._on_forwarder_pod,
        )
        self.clusters = informer(
            "DaskCluster",
            functools.partial(
                self._custom.list_cluster_custom_object, DASK_GROUP, DASK_VERSION, "daskclusters"
            ),
            self._on_cluster,
        )
        self.worker_groups = informer(
            "DaskWorkerGroup",
            functools.partial(
                self._custom.list_cluster_custom_object,
                DASK_GROUP,
                DASK_VERSION,
                "daskworkergroups",
            ),
            self._on_marked,
        )
        self.deployments = informer(
            "Deployment",
            self._apps.list_deployment_for_all_namespaces,
            self._on_marked,
            f"{COMPONENT_LABEL}=worker",
        )
        self.informers = [
            self.tunnels,
            self.pods,
            self.source_pods,
            self.services,
            self.slices,
            self.forwarders,
            self.clusters,
            self.worker_groups,
            self.deployments,
        ]

    # -- lifecycle ---------------------------------------------------------------------------

    def ready_check(self) -> str | None:
        """/readyz: ready once every watch has listed (leader and standby alike)."""
        waiting = [i.kind for i in self.informers if not i.synced]
        return f"watches not synced: {', '.join(waiting)}" if waiting else None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch, elect, reconcile while leading; ``started()`` once all watches have synced."""
        self.slice_version = await self._discover_slice_version()
        log.info("EndpointSlice API", version=f"{route.DISCOVERY_GROUP}/{self.slice_version}")
        async with anyio.create_task_group() as tg:
            for inf in self.informers:
                tg.start_soon(inf.run)
            waited = 0.0
            while (reason := self.ready_check()) is not None:
                # Informers expose a flag, not an event: poll it, with a log line now and then.
                await anyio.sleep(0.05)
                waited += 0.05
                if waited >= SYNC_LOG_INTERVAL:
                    waited = 0.0
                    log.warning("still waiting for watches", reason=reason)
            log.info("watches synced", identity=self.identity)
            await tg.start(self.leader.run, self._lead)
            task_status.started()

    async def _discover_slice_version(self) -> str:
        """``v1`` where the API server serves it, ``v1beta1`` otherwise (retried until known)."""
        backoff = 0.2
        while True:
            try:
                group = await call_json(
                    client.DiscoveryApi(self.api).get_api_group, _request_timeout=self._timeout
                )
                return route.choose_version(group)
            except Exception as exc:  # the API server may still be starting
                self._error("discovery")
                log.warning("API discovery failed", error=f"{type(exc).__name__}: {exc}"[:300])
                await anyio.sleep(backoff)
                backoff = min(10.0, backoff * 2)

    def _leadership_changed(self, leading: bool) -> None:
        self.metrics.is_leader.set(1 if leading else 0)

    async def _lead(self) -> None:
        """Everything only the leader does; cancelled when the Lease is lost."""
        async with anyio.create_task_group() as tg:
            self.queue.bind(tg)
            try:
                self._enqueue_everything()
                for _ in range(self.settings.workers):
                    tg.start_soon(self._worker)
                tg.start_soon(self.jobs.run)
                tg.start_soon(self._resync)
                tg.start_soon(self._gauges)
                await anyio.sleep_forever()
            finally:
                self.queue.bind(None)

    async def _resync(self) -> None:
        while True:
            await anyio.sleep(self.settings.resync_interval)
            self._enqueue_everything()

    async def _gauges(self) -> None:
        while True:
            self.update_gauges()
            await anyio.sleep(GAUGE_INTERVAL)

    def update_gauges(self) -> None:
        counts: dict[tuple[Any, Any], int] = {
            (c, s): 0 for c in CONDITIONS for s in ("True", "False", "Unknown")
        }
        for tunnel in self.tunnels.cache.values():
            for cond in (tunnel.get("status") or {}).get("conditions") or []:
                pair = (cond.get("type"), cond.get("status"))
                if pair in counts:
                    counts[pair] += 1
        for (cond_type, status), n in counts.items():
            self.metrics.tunnels.labels(condition=cond_type, status=status).set(n)
        self.metrics.queue_depth.set(len(self.queue))

    def _enqueue_everything(self) -> None:
        """Every Tunnel, plus every key still marked on an object (the orphan sweep)."""
        for key in list(self.tunnels.cache):
            self.queue.add(key)
        for inf in (self.slices, self.worker_groups, self.deployments):
            for obj in list(inf.cache.values()):
                self._enqueue_marks(obj)
        self.metrics.queue_depth.set(len(self.queue))

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get(wait=self.settings.resync_interval)
            self.metrics.queue_depth.set(len(self.queue))
            if key is None:
                continue
            started = time.perf_counter()
            try:
                await self.reconcile(key)
            except Exception as exc:
                kind = "conflict" if isinstance(exc, ApiException) and exc.status == 409 else "api"
                self._error(kind)
                self.metrics.reconciles.labels(result="error").inc()
                delay = self.queue.add_rate_limited(key)
                log.warning(
                    "reconcile failed",
                    tunnel=key,
                    retry_in=round(delay, 2),
                    error=f"{type(exc).__name__}: {exc}"[:500],
                )
            else:
                self.queue.forget(key)
                self.metrics.reconciles.labels(result="ok").inc()
            finally:
                self.reconciles += 1
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.queue.done(key)

    def _error(self, kind: str) -> None:
        self.metrics.errors.labels(kind=kind).inc()

    # -- event handlers: map any change to the Tunnel keys it concerns -----------------------

    def _on_tunnel(self, kind: str, obj: Obj) -> None:
        """Spec changes, deletions and new Tunnels; not status-only updates.

        Status is written by this reconciler (conditions) and by the forwarder (heartbeats);
        neither changes what should be routed, and following them would reconcile every Tunnel
        again after each heartbeat. The generation changes with the spec and with deletion.
        """
        key = key_of(obj)
        meta = obj.get("metadata") or {}
        # A newly refused peer (written by the forwarder) is the one status change that needs
        # a reconcile: its owner hears of it through an Event.
        seen = (
            meta.get("generation"),
            meta.get("deletionTimestamp"),
            meta.get("uid"),
            sources.refused_addresses(obj),
        )
        if kind == "DELETED":
            self._tunnel_seen.pop(key, None)
            self._owners.remove(key)
        elif self._tunnel_seen.get(key) == seen:
            return
        else:
            self._tunnel_seen[key] = seen
            user = (obj.get("spec") or {}).get("user")
            self._owners.set(key, user if isinstance(user, str) else None)
        self.queue.add(key)
        self.jobs.notice(obj)

    def _on_pod(self, _kind: str, pod: Obj) -> None:
        meta = pod.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        for key, tunnel in list(self.tunnels.cache.items()):
            claim = claimed_pod(tunnel)
            if claim is not None and claim[0] == ns and claim[1] == name:
                self.queue.add(key)
        cluster = labels_of(pod).get(CLUSTER_LABEL)
        if isinstance(ns, str) and cluster:
            self._enqueue_cluster(ns, cluster)

    def _on_source_pod(self, kind: str, pod: Obj) -> None:
        """A pod got or lost an IP, or changed owner labels: the allow-lists it may be in."""
        key = key_of(pod)
        self._pod_index.update(kind, pod)
        seen = (
            tuple(sources.pod_ips(pod)),
            tuple(sorted(labels_of(pod).items())),
            tuple(sorted(annotations_of(pod).items())),
        )
        if kind == "DELETED":
            if self._source_seen.pop(key, None) is None:
                return
        elif self._source_seen.get(key) == seen:
            return
        else:
            self._source_seen[key] = seen
        settings = self.settings
        if sources.is_operator(pod, settings.operator_namespace, settings.operator_pod_selector):
            keys = list(self.tunnels.cache)  # the operator may reach every tunnel
        else:
            keys = self._owners.owners_of(pod)
        # The Tunnels it mattered to before too: a pod relabelled away loses its place now.
        before = self._source_owners.pop(key, [])
        if kind != "DELETED":
            self._source_owners[key] = keys
        for tunnel_key in sorted(set(keys) | set(before)):
            self.queue.add(tunnel_key)

    def _allowed_sources(self, tunnel: Obj) -> list[str]:
        user = str((tunnel.get("spec") or {}).get("user"))
        found = sources.allowed_sources(
            user,
            self._pod_index.candidates(
                self.source_pods.cache, user, self.settings.operator_namespace
            ),
            self.users,
            self.settings.operator_pod_selector,
            self.settings.extra_allowed_sources,
            self.settings.operator_namespace,
        )
        if len(found) > sources.MAX_ALLOWED:  # the CRD's bound: write what fits, say so
            log.warning(
                "allow-list truncated",
                tunnel=key_of(tunnel),
                entries=len(found),
                kept=sources.MAX_ALLOWED,
            )
            found = found[: sources.MAX_ALLOWED]
        return found

    def _on_forwarder_pod(self, _kind: str, pod: Obj) -> None:
        """A forwarder pod's IP or readiness changed (or it went): its Tunnels' endpoints."""
        name = (pod.get("metadata") or {}).get("name")
        for key, tunnel in list(self.tunnels.cache.items()):
            if ((tunnel.get("spec") or {}).get("forwarder") or {}).get("podName") == name:
                self.queue.add(key)

    def _on_cluster(self, _kind: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        if isinstance(ns, str) and isinstance(name, str):
            self._enqueue_cluster(ns, name)

    def _on_marked(self, _kind: str, obj: Obj) -> None:
        """Services, our slices, worker groups, Deployments: marks, and their cluster's Tunnels."""
        self._enqueue_marks(obj)
        ns = (obj.get("metadata") or {}).get("namespace")
        cluster = labels_of(obj).get(CLUSTER_LABEL) or (obj.get("spec") or {}).get("cluster")
        if isinstance(ns, str) and isinstance(cluster, str) and cluster:
            self._enqueue_cluster(ns, cluster)

    def _enqueue_marks(self, obj: Obj) -> None:
        """Enqueue the Tunnel keys an object is marked with, if they are this namespace's.

        Keys of another namespace belong to another reconciler deployment: leave them alone.
        """
        keys = []
        by = route.routed_by(obj)
        if by is not None:
            keys.append(by.tunnel)
        record = workers.record_of(obj)
        if record is not None:
            keys.append(str(record["tunnel"]))
        for key in keys:
            if split_key(key)[0] == self.settings.namespace:
                self.queue.add(key)

    def _enqueue_cluster(self, ns: str, cluster: str) -> None:
        for key in self._tunnels_for_cluster(ns, cluster):
            self.queue.add(key)

    def _tunnels_for_cluster(self, ns: str, cluster: str) -> list[str]:
        found = []
        for key, tunnel in list(self.tunnels.cache.items()):
            if self._cluster_of.get(key) == (ns, cluster):
                found.append(key)
                continue
            claim = claimed_pod(tunnel)
            status_cluster = (tunnel.get("status") or {}).get("cluster")
            if claim is not None and claim[0] == ns and status_cluster == cluster:
                found.append(key)
        return found

    # -- the reconcile -----------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        ns, name = split_key(key)
        tunnel = await get_or_none(
            self._custom.get_namespaced_custom_object,
            TUNNEL_GROUP,
            TUNNEL_VERSION,
            ns,
            TUNNEL_PLURAL,
            name,
            _request_timeout=self._timeout,
        )
        if tunnel is None or (tunnel.get("metadata") or {}).get("deletionTimestamp"):
            await self._unroute(key, "the Tunnel is gone (session ended)")
            await self._remove_policy(key, gone=True)
            self._policy_errors.pop(key, None)
            self._cluster_of.pop(key, None)
            return

        verdict, pod = await self._verify(tunnel)
        job = self.jobs.verdict(tunnel)
        outcome = Outcome(job=job, cluster=verdict.cluster)
        outcome.verified = (
            ("True" if verdict.ok else "False"),
            verdict.reason,
            verdict.message,
        )
        if verdict.ok and verdict.cluster:
            self._cluster_of[key] = (claimed_pod(tunnel)[0], verdict.cluster)  # type: ignore[index]

        if job.ended:
            await self._unroute(key, f"the HTCondor job ended: {job.message}", emit=False)
            outcome.routed = ("False", "JobEnded", job.message)
            await self._finish(tunnel, outcome, verdict)
            await self._delete_tunnel(tunnel, job.message)
            return
        if not verdict.ok:
            await self._unroute(key, f"the claims no longer verify: {verdict.message}")
            await self._remove_policy(key)
            outcome.routed = ("False", "NotVerified", "claims not verified")
            await self._finish(tunnel, outcome, verdict)
            return
        assert pod is not None
        assert verdict.cluster is not None
        outcome.allowed_sources = self._allowed_sources(tunnel)
        # Before the route: the owner's first connections must find the list in place.
        await self._write_allow_list(tunnel, outcome.allowed_sources)
        await self._defence_in_depth(key, tunnel, outcome.allowed_sources)
        await self._route(key, tunnel, pod, verdict.cluster, outcome)
        await self._finish(tunnel, outcome, verdict)

    async def _verify(self, tunnel: Obj) -> tuple[Verdict, Obj | None]:
        claim = claimed_pod(tunnel)
        pod = node = None
        if claim is not None:
            pod = await get_or_none(
                self._core.read_namespaced_pod, claim[1], claim[0], _request_timeout=self._timeout
            )
        node_name = ((pod or {}).get("spec") or {}).get("nodeName")
        if pod is not None and self.nodes.labels and node_name:
            node = await get_or_none(
                self._core.read_node, node_name, _request_timeout=self._timeout
            )
        verdict = verify(tunnel, pod, node, self.users, self.nodes)
        if verdict.ok and self.settings.require_owner_chain:
            assert pod is not None
            assert verdict.cluster is not None
            chain = await self._owner_chain(pod, verdict.cluster)
            verdict = verify_owner_chain(tunnel, pod, chain, self.users)
        return verdict, pod

    async def _owner_chain(self, pod: Obj, cluster: str) -> OwnerChain:
        """Read the ReplicaSet, Deployment and DaskCluster the pod's chain should lead to.

        Fresh reads (not the watch caches): this decides whether traffic may be routed.
        """
        ns = str((pod.get("metadata") or {}).get("namespace"))
        rs_name = replica_set_name(pod)
        found: dict[str, Obj | None] = {"rs": None, "deployment": None, "cluster": None}

        async def read(what: str, call: Callable[..., Awaitable[Any]], *args: Any) -> None:
            found[what] = await get_or_none(call, *args, _request_timeout=self._timeout)

        async with anyio.create_task_group() as tg:
            if rs_name is not None:
                tg.start_soon(read, "rs", self._apps.read_namespaced_replica_set, rs_name, ns)
            tg.start_soon(
                read,
                "deployment",
                self._apps.read_namespaced_deployment,
                scheduler_deployment_name(cluster),
                ns,
            )
            tg.start_soon(
                functools.partial(
                    read,
                    "cluster",
                    self._custom.get_namespaced_custom_object,
                    DASK_GROUP,
                    DASK_VERSION,
                    ns,
                    "daskclusters",
                    cluster,
                )
            )
        return OwnerChain(found["rs"], found["deployment"], found["cluster"])

    async def _route(self, key: str, tunnel: Obj, pod: Obj, cluster: str, outcome: Outcome) -> None:
        spec = tunnel.get("spec") or {}
        pod_meta = pod.get("metadata") or {}
        ns = str(pod_meta.get("namespace"))
        tunnel_ns = split_key(key)[0]
        service_name = route.scheduler_service_name(cluster)
        slice_name = route.slice_name(service_name)
        forwarder = (spec.get("forwarder") or {}).get("podName")
        ports = route.session_ports(tunnel)
        if not isinstance(forwarder, str) or not forwarder or not ports:
            await self._unroute(key, "the session has no forwarder pod or no services")
            outcome.routed = ("False", "NoServices", "the session has no forwarder pod or ports")
            return
        by = route.RoutedBy(key, ns, str(pod_meta.get("name")), str(pod_meta.get("uid")))

        # Slices this key made that are no longer the right one (the claim moved on).
        for obj in list(self.slices.cache.values()):
            owner = route.routed_by(obj)
            if owner is not None and owner.tunnel == key and key_of(obj) != f"{ns}/{slice_name}":
                await self._remove_slice(key_of(obj), key, "the session moved to another pod")

        # Fresh reads: these decide where traffic goes.
        fwd_pod = await get_or_none(
            self._core.read_namespaced_pod, forwarder, tunnel_ns, _request_timeout=self._timeout
        )
        endpoint = route.forwarder_endpoint(fwd_pod)
        if endpoint is None:
            await self._unroute(key, f"forwarder pod {tunnel_ns}/{forwarder} has no pod IP")
            outcome.routed = (
                "False",
                "ForwarderPodNotFound",
                f"forwarder pod {tunnel_ns}/{forwarder} does not exist or has no pod IP",
            )
            return
        state: dict[str, Any] = {"superseded_by": None, "changed": False, "found": True}
        # The steady state (the slice already right) costs no request: the watch caches answer
        # it, and any change to the Service or the slice triggers another reconcile. Anything
        # that writes is computed from fresh reads.
        cached: dict[str, Obj | None] = {
            "service": self.services.cache.get(f"{ns}/{service_name}"),
            "slice": self.slices.cache.get(f"{ns}/{slice_name}"),
        }

        async def attempt() -> bool:
            service, current = cached.pop("service", None), cached.pop("slice", None)
            if service is not None and current is not None:
                owner = route.routed_by(current)
                wanted = route.desired_slice(service, endpoint, ports, by, self.slice_version)
                if owner == by and route.slice_patch(current, wanted) is None:
                    return False
            service = await get_or_none(
                self._core.read_namespaced_service, service_name, ns, _request_timeout=self._timeout
            )
            if service is None:
                state["found"] = False
                return False
            current = await get_or_none(
                self._custom.get_namespaced_custom_object,
                route.DISCOVERY_GROUP,
                self.slice_version,
                ns,
                route.SLICE_PLURAL,
                slice_name,
                _request_timeout=self._timeout,
            )
            owner = route.routed_by(current) if current is not None else None
            if owner is not None and owner.tunnel != key and self._newer_claim(owner.tunnel, key):
                state["superseded_by"] = owner.tunnel
                return False
            wanted = route.desired_slice(service, endpoint, ports, by, self.slice_version)
            return await self._write_slice(ns, current, wanted)

        state["changed"] = await self._retry(attempt)
        if not state["found"]:
            await self._unroute(key, f"Service {ns}/{service_name} does not exist")
            outcome.routed = (
                "False",
                "ServiceNotFound",
                f"Service {ns}/{service_name} does not exist (yet)",
            )
            return
        if state["superseded_by"] is not None:
            outcome.routed = (
                "False",
                "Superseded",
                f"Service {ns}/{service_name} is routed to the newer Tunnel "
                f"{state['superseded_by']}",
            )
            await self._restore_workers(key)
            return
        mapping = ", ".join(f"{n}->{p}" for n, p in sorted(ports.items()))
        if state["changed"]:
            log.info(
                "routed",
                tunnel=key,
                service=f"{ns}/{service_name}",
                forwarder=forwarder,
                ip=endpoint.ip,
                ready=endpoint.ready,
            )
        if not endpoint.ready:
            # The endpoint stays (not ready: kube-proxy skips it) so it comes back by itself.
            outcome.routed = (
                "False",
                "ForwarderNotReady",
                f"forwarder pod {tunnel_ns}/{forwarder} is not ready",
            )
            await self._make_ready(pod, False, None)
            return
        outcome.routed = (
            "True",
            "Routed",
            f"Service {ns}/{service_name} reaches forwarder pod {tunnel_ns}/{forwarder} "
            f"at {endpoint.ip} through EndpointSlice {slice_name} ({mapping})",
        )
        outcome.routed_service = f"{ns}/{service_name}"

        # The endpoint is what clients wait for; workers and readiness are independent of it and
        # of each other, so they go concurrently.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._route_workers, key, tunnel, ns, cluster, outcome)
            tg.start_soon(self._make_ready, pod, True, outcome)

    async def _write_slice(self, ns: str, current: Obj | None, wanted: Obj) -> bool:
        """Create or patch our slice to ``wanted``; True when something was written."""
        name = wanted["metadata"]["name"]
        args = (route.DISCOVERY_GROUP, self.slice_version, ns, route.SLICE_PLURAL)
        if current is not None and route.family_changed(current, wanted):
            await self._delete_slice(ns, name, current)  # addressType is immutable
            current = None
        if current is None:
            # A 409 (made in between) goes to the caller's retry, which reads and patches.
            await call_json(
                self._custom.create_namespaced_custom_object,
                *args,
                wanted,
                _request_timeout=self._timeout,
            )
            return True
        patch = route.slice_patch(current, wanted)
        if patch is None:
            return False
        await patch_json(
            self._custom.patch_namespaced_custom_object,
            *args,
            name,
            patch,
            request_timeout=self._timeout,
        )
        return True

    async def _delete_slice(self, ns: str, name: str, current: Obj) -> bool:
        """Delete our slice, only the very object read (UID precondition); False if gone."""
        uid = (current.get("metadata") or {}).get("uid")
        try:
            await call_json(
                self._custom.delete_namespaced_custom_object,
                route.DISCOVERY_GROUP,
                self.slice_version,
                ns,
                route.SLICE_PLURAL,
                name,
                body={"preconditions": {"uid": uid}},
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _newer_claim(self, other: str, mine: str) -> bool:
        """True when Tunnel ``other`` exists, is verified and is newer than ``mine``."""
        theirs = self.tunnels.cache.get(other)
        ours = self.tunnels.cache.get(mine)
        if theirs is None:
            return False
        conditions = {
            c.get("type"): c.get("status")
            for c in (theirs.get("status") or {}).get("conditions") or []
        }
        if conditions.get("Verified") != "True":
            return False

        def age(t: Obj | None) -> tuple[str, str]:
            meta = (t or {}).get("metadata") or {}
            return (str(meta.get("creationTimestamp", "")), str(meta.get("name", "")))

        return age(theirs) > age(ours)

    async def _route_workers(
        self, key: str, tunnel: Obj, ns: str, cluster: str, outcome: Outcome
    ) -> None:
        spec = tunnel.get("spec") or {}
        private_ip = spec.get("privateIP")
        if not isinstance(private_ip, str) or not private_ip:
            await self._restore_workers(key)
            return
        port = route.remote_port(tunnel, "scheduler") or 8786
        address = workers.scheduler_address(private_ip, port)
        changed: list[str] = []

        async def one(obj: Obj) -> None:
            if await self._patch_worker(obj, lambda o: workers.set_patch(o, key, address)):
                changed.append(f"{obj['kind']} {obj['metadata']['name']}")

        objects = await self._worker_objects(ns, cluster)
        async with anyio.create_task_group() as tg:
            for obj in objects:
                tg.start_soon(one, obj)
        if changed:
            outcome.notes.append(
                (
                    "WorkersUpdated",
                    f"DASK_SCHEDULER_ADDRESS={address} set on {', '.join(changed)}",
                    False,
                )
            )

    async def _worker_objects(self, ns: str, cluster: str) -> list[Obj]:
        lists: dict[str, Obj] = {}

        async def fetch(
            name: str, call: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
        ) -> None:
            lists[name] = await call_json(call, *args, _request_timeout=self._timeout, **kw)

        async with anyio.create_task_group() as tg:
            tg.start_soon(
                fetch,
                "groups",
                self._custom.list_namespaced_custom_object,
                DASK_GROUP,
                DASK_VERSION,
                ns,
                "daskworkergroups",
            )
            tg.start_soon(
                functools.partial(
                    fetch,
                    "deployments",
                    self._apps.list_namespaced_deployment,
                    ns,
                    label_selector=f"{CLUSTER_LABEL}={cluster},{COMPONENT_LABEL}=worker",
                )
            )
        groups, deployments = lists["groups"], lists["deployments"]
        found: list[Obj] = []
        for item in groups.get("items") or []:
            if (item.get("spec") or {}).get("cluster") == cluster:
                item.setdefault("kind", "DaskWorkerGroup")
                found.append(item)
        for item in deployments.get("items") or []:
            item.setdefault("kind", "Deployment")
            found.append(item)
        return found

    async def _patch_worker(
        self, obj: Obj, compute: Callable[[Obj], Obj | None], *, read_first: bool = False
    ) -> bool:
        """Patch a worker group or Deployment with what ``compute`` says; re-read on 409."""
        kind = obj.get("kind")
        ns, name = split_key(key_of(obj))
        current: dict[str, Obj | None] = {"obj": None if read_first else obj}

        async def read() -> Obj | None:
            if kind == "DaskWorkerGroup":
                fresh = await get_or_none(
                    self._custom.get_namespaced_custom_object,
                    DASK_GROUP,
                    DASK_VERSION,
                    ns,
                    "daskworkergroups",
                    name,
                    _request_timeout=self._timeout,
                )
            else:
                fresh = await get_or_none(
                    self._apps.read_namespaced_deployment, name, ns, _request_timeout=self._timeout
                )
            if fresh is not None:
                fresh.setdefault("kind", kind)
            return fresh

        async def attempt() -> bool:
            target = current["obj"]
            current["obj"] = None  # the next attempt (after a 409) reads afresh
            if target is None:
                target = await read()
            if target is None:
                return False
            patch = compute(target)
            if patch is None:
                return False
            try:
                if kind == "DaskWorkerGroup":
                    await patch_json(
                        self._custom.patch_namespaced_custom_object,
                        DASK_GROUP,
                        DASK_VERSION,
                        ns,
                        "daskworkergroups",
                        name,
                        patch,
                        request_timeout=self._timeout,
                    )
                else:
                    await patch_json(
                        self._apps.patch_namespaced_deployment,
                        name,
                        ns,
                        patch,
                        request_timeout=self._timeout,
                    )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            return True

        return await self._retry(attempt)

    async def _make_ready(self, pod: Obj, ready: bool, outcome: Outcome | None) -> bool:
        meta = pod.get("metadata") or {}
        patch = readiness.ready_patch(pod, ready)
        if patch is None:
            return False
        try:
            await patch_json(
                self._core.patch_namespaced_pod_status,
                meta["name"],
                meta["namespace"],
                patch,
                content_type=STRATEGIC_MERGE_PATCH,
                request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        self.metrics.readiness_writes.labels(ready=str(ready).lower()).inc()
        uid = str(meta.get("uid"))
        where = f"{meta['namespace']}/{meta['name']}"
        if ready and uid in self._made_ready:
            # The virtual kubelet wiped it again: routine, so no Event and a quiet log line.
            log.debug("scheduler pod readiness re-asserted", pod=where)
            return True
        if ready:
            self._made_ready.add(uid)
        else:
            self._made_ready.discard(uid)
        log.info("scheduler pod readiness", pod=where, ready=ready)
        if outcome is not None and ready:
            outcome.notes.append(
                (
                    "SchedulerReady",
                    f"pod {meta['name']}: Ready and ContainersReady set "
                    "(reachable through the tunnel)",
                    False,
                )
            )
        return True

    # -- undo ----------------------------------------------------------------------------------

    async def _unroute(self, key: str, why: str, *, emit: bool = True) -> list[str]:
        """Undo everything marked with ``key``; returns the clusters touched ("ns/cluster")."""
        touched: list[str] = []
        for obj in list(self.slices.cache.values()):
            owner = route.routed_by(obj)
            if owner is not None and owner.tunnel == key:
                cluster = await self._remove_slice(key_of(obj), key, why, emit=emit)
                if cluster:
                    touched.append(cluster)
        restored = await self._restore_workers(key)
        if restored and emit:
            by_cluster: dict[str, list[str]] = {}
            for obj in restored:
                ns = (obj.get("metadata") or {}).get("namespace", "")
                cl = labels_of(obj).get(CLUSTER_LABEL) or (obj.get("spec") or {}).get("cluster", "")
                what = f"{obj['kind']} {obj['metadata']['name']}"
                by_cluster.setdefault(f"{ns}/{cl}", []).append(what)
            for nc, names in by_cluster.items():
                cns, cname = split_key(nc)
                await self._cluster_event(
                    cns,
                    cname,
                    "WorkersRestored",
                    f"DASK_SCHEDULER_ADDRESS restored on {', '.join(names)}",
                )
        # Another Tunnel for the same cluster may have been waiting (superseded): look again.
        for nc in touched:
            cns, cname = split_key(nc)
            for other in self._tunnels_for_cluster(cns, cname):
                if other != key:
                    self.queue.add(other)
        return touched

    async def _remove_slice(
        self, slice_key: str, key: str, why: str, *, emit: bool = True
    ) -> str | None:
        ns, name = split_key(slice_key)
        found: dict[str, Any] = {}

        async def attempt() -> bool:
            current = await get_or_none(
                self._custom.get_namespaced_custom_object,
                route.DISCOVERY_GROUP,
                self.slice_version,
                ns,
                route.SLICE_PLURAL,
                name,
                _request_timeout=self._timeout,
            )
            if current is None:
                return False
            owner = route.routed_by(current)
            if owner is None or owner.tunnel != key:
                return False  # removed already, or taken over by another Tunnel
            # Not ready first: KubeCluster and the operator stop dialing the Service before
            # its endpoint goes (their errors are not all caught).
            pod = await get_or_none(
                self._core.read_namespaced_pod,
                owner.pod_name,
                owner.pod_namespace,
                _request_timeout=self._timeout,
            )
            if pod is not None and (pod.get("metadata") or {}).get("uid") == owner.pod_uid:
                await self._make_ready(pod, False, None)
            found["cluster"] = labels_of(current).get(CLUSTER_LABEL)
            found["service"] = labels_of(current).get(route.SERVICE_NAME_LABEL)
            return await self._delete_slice(ns, name, current)

        if not await self._retry(attempt):
            return None
        self.metrics.restored.labels(kind="EndpointSlice").inc()
        cluster = found.get("cluster")
        log.info("unrouted", tunnel=key, endpointslice=slice_key, why=why)
        if emit and cluster:
            await self._cluster_event(
                ns,
                cluster,
                "Unrouted",
                f"EndpointSlice {name} of Service {found.get('service')} deleted: {why}",
            )
        return f"{ns}/{cluster}" if cluster else None

    async def _restore_workers(self, key: str) -> list[Obj]:
        marked = [
            obj
            for inf in (self.worker_groups, self.deployments)
            for obj in list(inf.cache.values())
            if (workers.record_of(obj) or {}).get("tunnel") == key
        ]
        return await self._restore_worker_objects(marked, key)

    async def _restore_worker_objects(self, marked: list[Obj], key: str) -> list[Obj]:
        restored = []
        for obj in marked:
            ns = str((obj.get("metadata") or {}).get("namespace", ""))
            found = labels_of(obj).get(CLUSTER_LABEL) or (obj.get("spec") or {}).get("cluster")
            cluster = found if isinstance(found, str) else None

            def compute(o: Obj, cluster: str | None = cluster, ns: str = ns) -> Obj | None:
                record = workers.record_of(o)
                if record is None or record.get("tunnel") != key:
                    return None  # restored already, or someone else's now
                return workers.restore_patch(o, cluster, ns)

            # The cached copy may be stale: read first.
            if await self._patch_worker(obj, compute, read_first=True):
                restored.append(obj)
                self.metrics.restored.labels(kind=str(obj.get("kind"))).inc()
        return restored

    async def _write_allow_list(self, tunnel: Obj, allowed: list[str]) -> None:
        status = tunnel.get("status") or {}
        if status.get("allowedSources") == allowed:
            return
        updated = await self._patch_status(tunnel, {"allowedSources": allowed})
        if updated is not None:
            tunnel["status"] = updated.get("status") or {}

    async def _patch_status(self, tunnel: Obj, status: Obj) -> Obj | None:
        """Merge ``status`` into the Tunnel's; None if the Tunnel is gone."""
        meta = tunnel.get("metadata") or {}
        try:
            return await patch_json(
                self._custom.patch_namespaced_custom_object_status,
                TUNNEL_GROUP,
                TUNNEL_VERSION,
                meta["namespace"],
                TUNNEL_PLURAL,
                meta["name"],
                {"status": status},
                request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None

    async def _defence_in_depth(self, key: str, tunnel: Obj, allowed: list[str]) -> None:
        """The NetworkPolicy, without holding routing hostage: the forwarder's allow-list is the
        control, the policy a second wall. Refused for good (no RBAC for it, a CNI webhook
        rejecting it): say so once per Tunnel and cause, count it, and route anyway."""
        try:
            await self._ensure_policy(key, tunnel, allowed)
        except ApiException as exc:
            if not self._policy_refused(key, exc):
                raise  # transient: the reconcile is retried
            return
        self._policy_errors.pop(key, None)

    async def _ensure_policy(self, key: str, tunnel: Obj, allowed: list[str]) -> None:
        """The Tunnel's NetworkPolicy as :func:`policy.desired_policy` says (idempotent)."""
        if not self.settings.network_policies:
            return
        wanted = policy.desired_policy(
            tunnel,
            self.users,
            self.settings.operator_pod_selector,
            self.settings.extra_allowed_sources,
            self.settings.operator_namespace,
            allowed,
        )
        if wanted is None:
            await self._remove_policy(key)
            return
        ns, name = split_key(key)
        # A fresh read, not a watch: a reconciler whose RBAC lacks networkpolicies must still
        # start and route (a watch it may not list would hold its start forever).
        current = await get_or_none(
            self._net.read_namespaced_network_policy, name, ns, _request_timeout=self._timeout
        )
        self._policies_written.add(key)
        if current is not None and not policy.needs_update(current, wanted):
            return
        try:
            await call_json(
                self._net.create_namespaced_network_policy,
                ns,
                wanted,
                _request_timeout=self._timeout,
            )
            log.info("network policy created", tunnel=key)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        meta = wanted["metadata"]
        await patch_json(
            self._net.patch_namespaced_network_policy,
            name,
            ns,
            {
                "metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]},
                "spec": wanted["spec"],
            },
            request_timeout=self._timeout,
        )
        log.info("network policy updated", tunnel=key)

    async def _remove_policy(self, key: str, *, gone: bool = False) -> None:
        """Delete the Tunnel's policy: when it is gone (its owner reference would too, later),
        or when this replica wrote one for claims that no longer verify."""
        if not self.settings.network_policies:
            return
        if not gone and key not in self._policies_written:
            return
        self._policies_written.discard(key)
        ns, name = split_key(key)
        try:
            await call_json(
                self._net.delete_namespaced_network_policy, name, ns, _request_timeout=self._timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            if not self._policy_refused(key, exc):
                raise
            return
        log.info("network policy deleted", tunnel=key)

    def _policy_refused(self, key: str, exc: ApiException) -> bool:
        """A refusal for good (403: no RBAC for it; 422: a webhook or validation says no):
        said once per Tunnel and cause, counted. False for what a retry may fix."""
        if exc.status not in (403, 422):
            return False
        self._error("networkpolicy")
        message = f"{exc.status} {exc.reason}"
        if self._policy_errors.get(key) != message:
            log.warning("network policy not written", tunnel=key, error=message)
        self._policy_errors[key] = message
        return True

    async def _delete_tunnel(self, tunnel: Obj, why: str) -> None:
        meta = tunnel.get("metadata") or {}
        try:
            await call_json(
                self._custom.delete_namespaced_custom_object,
                TUNNEL_GROUP,
                TUNNEL_VERSION,
                meta["namespace"],
                TUNNEL_PLURAL,
                meta["name"],
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("tunnel deleted", tunnel=key_of(tunnel), why=why)

    # -- status and Events ---------------------------------------------------------------------

    async def _finish(self, tunnel: Obj, outcome: Outcome, verdict: Verdict) -> None:
        """Write the status (if it changed) and one Event per transition."""
        status = tunnel.get("status") or {}
        old = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
        wanted: dict[str, tuple[str, str, str]] = {
            "Verified": outcome.verified,
            "Routed": outcome.routed,
        }
        job = outcome.job
        if job is not None:
            wanted["JobRunning"] = (job.status, job.reason, job.message)
        now = rfc3339()
        conditions = []
        transitions: dict[str, tuple[str | None, str]] = {}
        for cond_type, (cond_status, reason, message) in wanted.items():
            previous = old.get(cond_type) or {}
            changed = previous.get("status") != cond_status
            if changed:
                transitions[cond_type] = (previous.get("status"), cond_status)
            conditions.append(
                {
                    "type": cond_type,
                    "status": cond_status,
                    "reason": reason or cond_type,
                    "message": message,
                    "lastTransitionTime": (
                        now if changed else previous.get("lastTransitionTime", now)
                    ),
                }
            )
        session_id = (tunnel.get("spec") or {}).get("sessionId")
        refused = sources.unreported(tunnel)
        reported = sorted(sources.reported(tunnel) | {key for key, _ in refused})
        reported = reported[: sources.MAX_REPORTED_KEYS]
        new_status = {
            "conditions": conditions,
            "cluster": outcome.cluster,
            "routedService": outcome.routed_service,
            "observedSessionId": session_id,
            "allowedSources": outcome.allowed_sources,
            "reportedRefusals": reported,
        }
        current = {key: status.get(key) for key in new_status}
        if new_status != current and await self._patch_status(tunnel, new_status) is None:
            return
        for key, entry in refused:
            note = _refusal_note(tunnel, key, entry)
            outcome.notes.append(note)
            outcome.tunnel_notes.append(note)  # also where an operator looks, cluster or not
        await self._emit_transitions(tunnel, outcome, transitions, verdict)

    async def _emit_transitions(
        self,
        tunnel: Obj,
        outcome: Outcome,
        transitions: dict[str, tuple[str | None, str]],
        verdict: Verdict,
    ) -> None:
        tref = Ref.tunnel(tunnel)
        ns = ((tunnel.get("spec") or {}).get("pod") or {}).get("namespace")
        cluster = outcome.cluster
        user = (tunnel.get("spec") or {}).get("user")

        # Events are independent and best effort: written concurrently, after the decision.
        pending: list[Callable[[], Coroutine[Any, Any, None]]] = []

        def on_cluster(reason: str, message: str, warning: bool = False) -> None:
            if isinstance(ns, str) and cluster:
                pending.append(
                    functools.partial(
                        self._cluster_event, ns, cluster, reason, message, warning=warning
                    )
                )

        if "Verified" in transitions:
            if verdict.ok:
                pending.append(
                    functools.partial(self.events.emit, tref, "Verified", verdict.message)
                )
            else:
                text = f"session of user {user} refused: {verdict.message}"
                pending.append(
                    functools.partial(self.events.emit, tref, "Refused", text, warning=True)
                )
                on_cluster("TunnelRefused", text, True)
        if "Routed" in transitions:
            status, reason, message = outcome.routed
            if status == "True":
                pending.append(functools.partial(self.events.emit, tref, "Routed", message))
                on_cluster("Routed", message)
            elif transitions["Routed"][0] == "True" or reason not in ("NotVerified", "JobEnded"):
                pending.append(
                    functools.partial(
                        self.events.emit, tref, reason, message, warning=reason != "JobEnded"
                    )
                )
                if reason not in ("NotVerified", "JobEnded"):
                    self.metrics.unrouted.labels(reason=reason).inc()
                    log.warning("not routed", tunnel=key_of(tunnel), reason=reason, why=message)
                    on_cluster(reason, message, True)
        job = outcome.job
        if "JobRunning" in transitions and job is not None and job.status == "False":
            pending.append(
                functools.partial(self.events.emit, tref, job.reason, job.message, warning=True)
            )
            if verdict.ok:
                on_cluster(job.reason, f"{job.message}; the tunnel is closed", True)
        for reason, message, warning in outcome.notes:
            on_cluster(reason, message, warning)
        for reason, message, warning in outcome.tunnel_notes:
            pending.append(
                functools.partial(self.events.emit, tref, reason, message, warning=warning)
            )
        async with anyio.create_task_group() as tg:
            for call in pending:
                tg.start_soon(call)

    async def _cluster_event(
        self, ns: str, cluster: str, reason: str, message: str, *, warning: bool = False
    ) -> None:
        obj = self.clusters.cache.get(f"{ns}/{cluster}")
        if obj is None:
            try:
                obj = await get_or_none(
                    self._custom.get_namespaced_custom_object,
                    DASK_GROUP,
                    DASK_VERSION,
                    ns,
                    "daskclusters",
                    cluster,
                    _request_timeout=self._timeout,
                )
            except Exception as exc:  # best effort, like the Event itself
                log.warning("DaskCluster not read for an Event", cluster=cluster, error=str(exc))
                obj = None
        if obj is None:
            return
        obj.setdefault("apiVersion", f"{DASK_GROUP}/{DASK_VERSION}")
        await self.events.emit(Ref.dask_cluster(obj), reason, message, warning=warning)

    async def _retry(self, attempt: Callable[[], Awaitable[bool]]) -> bool:
        return await retry_conflicts(attempt)
