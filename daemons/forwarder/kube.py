"""Publishing sessions as ``Tunnel`` objects (``tunnels.jobtunnel.io``) in Kubernetes.

Level-triggered: ``publish``/``unpublish``/``heartbeat`` only change the *desired* state (one
Tunnel body per Tunnel name) and wake :meth:`KubernetesPublisher.run`, which converges the API
towards it and keeps converging across API errors and API server restarts:

- missing Tunnels are created (owned by this forwarder's pod, so the garbage collector removes
  them with the pod), changed ones (a takeover) are updated in place, Tunnels labelled with this
  pod that nobody wants any more are deleted (at startup too: leftovers of an earlier
  incarnation of the same pod name), ``status.lastHeartbeat`` is patched, throttled;
- a list + watch of this pod's Tunnels keeps a cache of what exists; a Tunnel that disappears
  while its session is still wanted (deleted by an operator, garbage-collected, or taken over by
  another forwarder replica) ends that session through ``end_session``.

A Tunnel's name is stable per session identity (``<user>-<hash>``), so a reconnect of the same
scheduler, on this replica or another, updates the same object. Nothing secret is ever written:
a Tunnel holds the session's claims, never the token it authenticated with.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskGroup, TaskStatus
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter

from daemons.forwarder.sessions import EndSession, Session
from shared.logs import get_logger
from shared.sources import AllowList, parse_network

log = get_logger("jobtunnel.forwarder.kube")

GROUP = "jobtunnel.io"
VERSION = "v1alpha1"
PLURAL = "tunnels"
KIND = "Tunnel"
LABEL_FORWARDER_POD = "jobtunnel.io/forwarder-pod"
LABEL_USER = "jobtunnel.io/user"
LABEL_IDENTITY_HASH = "jobtunnel.io/identity-hash"
MERGE_PATCH = "application/merge-patch+json"
HASH_LENGTH = 32  # hex digits: 128 bits
NAME_MAX = 63


#: Seconds a hello waits for the cross-replica takeover check before going on without it.
HELD_CHECK_TIMEOUT = 2.0


class KubeConfigError(Exception):
    """Neither ``KUBECONFIG`` nor an in-cluster service account gave a usable configuration."""


async def create_api_client() -> k8s.ApiClient:
    """An API client from ``KUBECONFIG`` when set, else the pod's in-cluster service account."""
    configuration = k8s.Configuration()
    try:
        if os.environ.get("KUBECONFIG"):
            await k8s_config.load_kube_config(
                config_file=os.environ["KUBECONFIG"], client_configuration=configuration
            )
        else:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except (k8s_config.ConfigException, OSError) as exc:
        where = "KUBECONFIG" if os.environ.get("KUBECONFIG") else "in-cluster service account"
        raise KubeConfigError(f"no kubernetes configuration ({where}): {exc}") from exc
    return k8s.ApiClient(configuration)


# Names and labels


def identity_key(session: Session) -> str:
    """What makes two sessions "the same scheduler": the identity, else the session itself."""
    return ":".join(session.identity) if session.identity is not None else session.id


def identity_hash(session: Session) -> str:
    """First hex digits of sha256(identity): in the Tunnel name and its identity-hash label.

    The parts are NUL-separated (neither can contain NUL, ``:`` can) and 128 bits are kept:
    the user slug is lossy and the rest attacker-chosen, so the hash alone keeps two users'
    names apart, beyond reach of a brute-force search.
    """
    parts = session.identity if session.identity is not None else (session.user, session.id)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:HASH_LENGTH]


def dns_label(text: str, fallback: str = "user") -> str:
    """``text`` as a DNS-1123 label fragment: lower case alphanumerics and single dashes."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned or fallback


def label_value(text: str, fallback: str = "unknown") -> str:
    """``text`` as a label value: at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")
    return cleaned or fallback


def tunnel_name(session: Session) -> str:
    """``<sanitised user>-<hash of identity>``: stable across reconnects, DNS-1123, <= 63."""
    digest = identity_hash(session)
    user = dns_label(session.user)[: NAME_MAX - HASH_LENGTH - 1].rstrip("-") or "user"
    return f"{user}-{digest}"


def iso_time(ts: float) -> str:
    """RFC 3339 in UTC with milliseconds, as the CRD's ``date-time`` fields want."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """An RFC 7386 merge patch turning ``old`` into ``new`` (removed keys become null)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch


# Desired state


def _refusals(session: Session) -> dict[str, Any]:
    """What the owner should hear about, stamped with the session that saw it (a takeover's
    new session starts with none, and the old one's are not news)."""
    return {
        "refusedSources": session.refused_sources(),
        "refusedClaims": session.refused_claimants(),
        "refusalsSessionId": session.id,
    }


def _counts(refusals: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(len(refusals.get(key) or []) for key in ("refusedSources", "refusedClaims"))


@dataclass(slots=True)
class _Desired:
    session_id: str
    labels: dict[str, str]
    spec: dict[str, Any]
    heartbeat: float
    # status.refusedSources / refusedClaims, as the session last reported them.
    refusals: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _StatusSent:
    session_id: str
    heartbeat: float
    at: float  # monotonic
    refused: tuple[int, ...] = ()  # how many distinct refused peers that patch carried


class TunnelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.syncs = Counter(
            "jobtunnel_forwarder_tunnel_syncs",
            "Successful Tunnel writes, by operation (create, update, delete, status)",
            ["operation"],
            registry=registry,
        )
        self.errors = Counter(
            "jobtunnel_forwarder_tunnel_sync_errors",
            "Failed Kubernetes API calls, by operation (retried with backoff)",
            ["operation"],
            registry=registry,
        )
        self.heartbeats = Counter(
            "jobtunnel_forwarder_tunnel_heartbeats",
            "Session heartbeats seen for published Tunnels (status patches are throttled)",
            registry=registry,
        )
        self.ended = Counter(
            "jobtunnel_forwarder_tunnel_sessions_ended",
            "Sessions ended because their Tunnel was deleted or taken over",
            ["reason"],
            registry=registry,
        )


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}".strip()
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


class _WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class KubernetesPublisher:
    """The Publisher that makes each published session a Tunnel object."""

    def __init__(
        self,
        api: k8s.ApiClient,
        *,
        namespace: str,
        pod_name: str,
        pod_ip: str,
        heartbeat_interval: float = 30.0,
        registry: CollectorRegistry | None = None,
        request_timeout: float = 10.0,
        start_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        watch_timeout: int = 240,
        holder_stale_after: float | None = None,
    ) -> None:
        self.namespace = namespace
        self.pod_name = pod_name
        self.pod_ip = pod_ip
        self.heartbeat_interval = heartbeat_interval
        self.metrics = TunnelMetrics(registry if registry is not None else CollectorRegistry())
        self._request_timeout = request_timeout
        self._start_timeout = start_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._watch_timeout = watch_timeout
        # Another replica's Tunnel counts as held while its heartbeat is younger than this:
        # a live session's is at most one throttle interval plus an agent heartbeat old.
        self.holder_stale_after = (
            holder_stale_after if holder_stale_after is not None else 2.5 * heartbeat_interval
        )
        # The generated API's stubs lack `_content_type` and take only model bodies: use Any.
        self._core: Any = k8s.CoreV1Api(api)
        self._custom: Any = k8s.CustomObjectsApi(api)
        self._selector = f"{LABEL_FORWARDER_POD}={pod_name}"

        self._desired: dict[str, _Desired] = {}
        self._observed: dict[str, dict[str, Any]] = {}
        self._allow_lists: dict[str, tuple[str | None, AllowList]] = {}
        self._held_check_error: str | None = None
        self._status_sent: dict[str, _StatusSent] = {}
        self._checking: set[str] = set()
        self._errors: dict[str, str] = {}
        self._pod_uid: str | None = None
        self._initialised = anyio.Event()
        self._listed = anyio.Event()
        self._wake = anyio.Event()
        self._end_session: EndSession | None = None
        self._tg: TaskGroup | None = None

    # -- the Publisher protocol -----------------------------------------------------------------

    async def run(
        self, end_session: EndSession, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
    ) -> None:
        self._end_session = end_session
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._initialise)
            tg.start_soon(self._watch_loop)
            tg.start_soon(self._sync_loop)
            # Don't hold the forwarder's start hostage to an API outage: ready_check says
            # "not ready" until the first sync, and the loops keep trying.
            with anyio.move_on_after(self._start_timeout):
                await self._initialised.wait()
                await self._listed.wait()
            if not self._initialised.is_set():
                log.warning("starting before kubernetes is reachable", error=self.ready_check())
            task_status.started()

    async def publish(self, session: Session) -> None:
        name = tunnel_name(session)
        self._desired[name] = _Desired(
            session_id=session.id,
            labels=self._labels(session),
            spec=self._spec(session),
            heartbeat=session.last_heartbeat or time.time(),
            refusals=_refusals(session),
        )
        self._wake.set()

    async def unpublish(self, session: Session, reason: str) -> None:
        name = tunnel_name(session)
        desired = self._desired.get(name)
        if desired is not None and desired.session_id == session.id:
            del self._desired[name]
            self._wake.set()

    def heartbeat(self, session: Session) -> None:
        desired = self._desired.get(tunnel_name(session))
        if desired is None or desired.session_id != session.id:
            return
        self.metrics.heartbeats.inc()
        desired.heartbeat = session.last_heartbeat or time.time()
        sent = self._status_sent.get(tunnel_name(session))
        if sent is None or time.monotonic() - sent.at >= self.heartbeat_interval:
            self._wake.set()

    async def held_elsewhere(self, session: Session) -> str | None:
        """The identity's Tunnel held by another replica with a fresh heartbeat.

        Our own Tunnels are the registry's business (the liveness challenge); this covers the
        claimant that reached another replica than the holder. A Tunnel whose replica stopped
        heartbeating (a dead pod not yet collected) does not hold anything.
        """
        name = tunnel_name(session)
        try:
            # Short: every hello waits on it, and an API outage fails open anyway.
            with anyio.fail_after(min(self._request_timeout, HELD_CHECK_TIMEOUT)):
                obj = await self._get(name)
        except Exception as exc:
            # Counted and logged, not a readiness failure: the claim goes ahead (fail open).
            self.metrics.errors.labels(operation="held-elsewhere").inc()
            message = _describe_error(exc)
            if message != self._held_check_error:
                log.warning("takeover check failed: letting the claim go on", error=message)
            self._held_check_error = message
            return None
        self._held_check_error = None
        if obj is None:
            return None
        spec = obj.get("spec") or {}
        holder = (spec.get("forwarder") or {}).get("podName")
        if holder == self.pod_name or spec.get("user") != session.user:
            return None
        status = obj.get("status") or {}
        beat = status.get("lastHeartbeat") or (obj.get("metadata") or {}).get("creationTimestamp")
        try:
            age = time.time() - datetime.fromisoformat(str(beat)).timestamp()
        except ValueError:
            return None
        if age > self.holder_stale_after:
            return None
        return (
            f"session {spec.get('sessionId')} on forwarder pod {holder} "
            f"(Tunnel {name}, heartbeat {max(age, 0.0):.0f}s ago)"
        )

    def admits_source(self, session: Session, host: str) -> bool | None:
        """The allow-list the reconciler wrote in the Tunnel's status; None before it has."""
        obj = self._observed.get(tunnel_name(session))
        if obj is None or (obj.get("spec") or {}).get("user") != session.user:
            return None
        if "allowedSources" not in (obj.get("status") or {}):
            return None
        return self._allow_list(obj).admits(host)

    def refusals_changed(self, session: Session) -> None:
        desired = self._desired.get(tunnel_name(session))
        if desired is None or desired.session_id != session.id:
            return
        before = _counts(desired.refusals)
        desired.refusals = _refusals(session)
        if _counts(desired.refusals) != before:  # a new peer: now; counts ride on the next beat
            self._wake.set()

    def _allow_list(self, obj: Mapping[str, Any]) -> AllowList:
        """Parsed once per resourceVersion; an entry that is not a CIDR admits nobody."""
        meta = obj.get("metadata") or {}
        name, version = str(meta.get("name")), meta.get("resourceVersion")
        cached = self._allow_lists.get(name)
        if cached is not None and cached[0] == version:
            return cached[1]
        networks = []
        for item in (obj.get("status") or {}).get("allowedSources") or []:
            try:
                networks.append(parse_network(str(item)))
            except ValueError as exc:
                log.warning("allowedSources entry ignored", tunnel=name, error=str(exc)[:200])
        allow = AllowList(tuple(networks))
        if len(self._allow_lists) > 2 * len(self._observed) + 16:  # Tunnels gone since
            self._allow_lists = {n: v for n, v in self._allow_lists.items() if n in self._observed}
        self._allow_lists[name] = (version, allow)
        return allow

    def ready_check(self) -> str | None:
        for error in self._errors.values():
            return f"kubernetes api unreachable: {error}"
        if not self._initialised.is_set() or not self._listed.is_set():
            return "kubernetes: not synced yet"
        return None

    # -- introspection (tests, /tunnels debugging) -------------------------------------------

    @property
    def pod_uid(self) -> str | None:
        return self._pod_uid

    def desired_names(self) -> dict[str, str]:
        """Tunnel name -> session id of everything this forwarder wants published."""
        return {name: d.session_id for name, d in self._desired.items()}

    # -- bodies -----------------------------------------------------------------------------------

    def _labels(self, session: Session) -> dict[str, str]:
        return {
            LABEL_FORWARDER_POD: self.pod_name,
            LABEL_USER: label_value(session.user),
            LABEL_IDENTITY_HASH: identity_hash(session),
        }

    def _spec(self, session: Session) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "sessionId": session.id,
            "user": session.user,
            "identity": session.identity[1]
            if session.identity is not None
            else f"session:{session.id}",
            "mode": session.mode,
            "forwarder": {"podName": self.pod_name, "podIP": self.pod_ip},
            "services": [
                {"name": name, "port": fwd.port}
                | (
                    {"remotePort": session.service_ports[name]}
                    if name in session.service_ports
                    else {}
                )
                for name, fwd in sorted(session.forwards.items())
            ],
            "since": iso_time(session.since),
        }
        if session.pod is not None:
            spec["pod"] = {
                "namespace": session.pod.namespace,
                "name": session.pod.name,
                "uid": session.pod.uid,
            }
        if session.job is not None:
            spec["job"] = {
                "globalJobId": session.job.global_job_id,
                "clusterId": session.job.cluster_id,
                "procId": session.job.proc_id,
                "schedd": session.job.schedd,
            }
        if session.private_ip:
            spec["privateIP"] = session.private_ip
        return spec

    def _owner(self) -> dict[str, Any]:
        assert self._pod_uid is not None
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": self.pod_name,
            "uid": self._pod_uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }

    def _owners_for(self, obj: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Our pod as the only Pod owner; owners of other kinds (if anyone adds some) stay."""
        existing = obj.get("metadata", {}).get("ownerReferences") or []
        return [r for r in existing if r.get("kind") != "Pod"] + [self._owner()]

    def _matches(self, obj: Mapping[str, Any], desired: _Desired) -> bool:
        meta = obj.get("metadata", {})
        labels = meta.get("labels") or {}
        pod_owners = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == "Pod"]
        return (
            obj.get("spec") == desired.spec
            and all(labels.get(k) == v for k, v in desired.labels.items())
            and [r.get("uid") for r in pod_owners] == [self._pod_uid]
        )

    def _is_ours(self, obj: Mapping[str, Any]) -> bool:
        """Labelled with this pod *and* held by it: never delete another replica's Tunnel."""
        labels = obj.get("metadata", {}).get("labels") or {}
        holder = (obj.get("spec") or {}).get("forwarder", {}).get("podName")
        return labels.get(LABEL_FORWARDER_POD) == self.pod_name and holder == self.pod_name

    # -- state helpers ----------------------------------------------------------------------------

    def _error(self, source: str, operation: str | None, exc: BaseException) -> None:
        message = _describe_error(exc)
        if operation is not None:
            self.metrics.errors.labels(operation=operation).inc()
        if self._errors.get(source) != message:
            log.warning("kubernetes api error", source=source, operation=operation, error=message)
        self._errors[source] = message

    def _ok(self, source: str) -> None:
        if self._errors.pop(source, None) is not None:
            log.info("kubernetes api reachable again", source=source)

    def _observe(self, obj: dict[str, Any]) -> None:
        self._observed[obj["metadata"]["name"]] = obj

    async def _get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._custom.get_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                _request_timeout=self._request_timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    # -- start: label our pod, learn its UID ------------------------------------------------------

    async def _initialise(self) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                pod = await self._core.patch_namespaced_pod(
                    self.pod_name,
                    self.namespace,
                    {"metadata": {"labels": {LABEL_FORWARDER_POD: self.pod_name}}},
                    _content_type=MERGE_PATCH,
                    _request_timeout=self._request_timeout,
                )
            except Exception as exc:
                self._error("pod", "label-pod", exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            self._ok("pod")
            self._pod_uid = str(pod.metadata.uid)
            pod_ip = pod.status.pod_ip if pod.status is not None else None
            if pod_ip and pod_ip != self.pod_ip:
                log.warning("pod IP differs from configured pod_ip", pod_ip=pod_ip)
            log.info("forwarder pod labelled", pod=self.pod_name, uid=self._pod_uid)
            self._initialised.set()
            self._wake.set()
            return

    # -- list + watch our Tunnels -----------------------------------------------------------------

    async def _watch_loop(self) -> None:
        backoff = self._backoff_initial
        while True:
            try:
                resource_version = await self._relist()
                self._ok("watch")
                backoff = self._backoff_initial
                await self._watch(resource_version)
                # Normal end (server-side timeout): list again, which doubles as a resync.
            except _WatchExpired:
                continue
            except Exception as exc:
                self._error("watch", "watch", exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    async def _relist(self) -> str:
        result = await self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            label_selector=self._selector,
            _request_timeout=self._request_timeout,
        )
        listed = {item["metadata"]["name"]: item for item in result.get("items", [])}
        for name, old in list(self._observed.items()):
            if name not in listed:
                self._gone(old)
        self._observed = listed
        self._listed.set()
        self._wake.set()
        return str(result["metadata"]["resourceVersion"])

    async def _watch(self, resource_version: str) -> None:
        response = await self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            label_selector=self._selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=resource_version,
            timeout_seconds=self._watch_timeout,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=self._request_timeout, sock_read=self._watch_timeout + 30
            ),
        )
        try:
            if not 200 <= response.status <= 299:
                body = (await response.read())[:500].decode(errors="replace")
                if response.status == 410:
                    raise _WatchExpired()
                raise ApiException(status=response.status, reason=body)
            while True:
                line = await response.content.readline()
                if not line:
                    return
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpired()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                if kind in ("ADDED", "MODIFIED"):
                    self._observe(obj)
                    self._wake.set()
                elif kind == "DELETED":
                    name = obj["metadata"]["name"]
                    current = self._observed.get(name)
                    if current is not None and current["metadata"].get("uid") == obj[
                        "metadata"
                    ].get("uid"):
                        del self._observed[name]
                    self._gone(obj)
                    self._wake.set()
        finally:
            response.release()

    def _gone(self, obj: Mapping[str, Any]) -> None:
        """One of our Tunnels left our view: if its session is still wanted, find out why."""
        name = obj["metadata"]["name"]
        session_id = (obj.get("spec") or {}).get("sessionId")
        desired = self._desired.get(name)
        if desired is None or desired.session_id != session_id or name in self._checking:
            return  # we deleted it ourselves, or it was a previous session's object
        assert self._tg is not None
        self._checking.add(name)
        self._tg.start_soon(self._confirm_gone, name, desired.session_id)

    async def _confirm_gone(self, name: str, session_id: str) -> None:
        """Read the Tunnel back: deleted, taken over by another replica, or a stale view."""
        backoff = self._backoff_initial
        try:
            while True:
                desired = self._desired.get(name)
                if desired is None or desired.session_id != session_id:
                    return
                try:
                    obj = await self._get(name)
                except Exception as exc:
                    self._error("watch", "get", exc)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                break
            desired = self._desired.get(name)
            if desired is None or desired.session_id != session_id:
                return
            if obj is None:
                reason, code = "Tunnel deleted", "deleted"
            else:
                holder = (obj.get("spec") or {}).get("forwarder", {}).get("podName")
                if holder == self.pod_name:
                    self._observe(obj)  # still ours: our view was stale
                    self._wake.set()
                    return
                # Another replica holds the newer session: our agent must stand down.
                reason, code = f"Tunnel taken over by forwarder pod {holder}", "replaced"
            del self._desired[name]
            self._status_sent.pop(name, None)
            self.metrics.ended.labels(reason=code).inc()
            log.info("tunnel gone: ending session", tunnel=name, session=session_id, reason=reason)
            if self._end_session is not None:
                self._end_session(
                    session_id, reason, "replaced" if code == "replaced" else "session-ended"
                )
        finally:
            self._checking.discard(name)

    # -- converge ---------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        await self._initialised.wait()
        await self._listed.wait()
        backoff = self._backoff_initial
        while True:
            self._wake = anyio.Event()
            try:
                next_due = await self._converge()
            except Exception as exc:
                self._error("sync", None, exc)  # counted per operation by _converge
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            self._ok("sync")
            backoff = self._backoff_initial
            with anyio.move_on_after(next_due):
                await self._wake.wait()

    async def _converge(self) -> float:
        """One pass over desired and observed state; returns seconds until a status is due.

        Every item is tried even when one fails; the first failure is raised at the end so the
        loop backs off and ``ready_check`` reports it.
        """
        failure: Exception | None = None
        next_due = math.inf
        for name, desired in list(self._desired.items()):
            if name in self._checking:
                continue  # gone from our view: ending its session, not recreating it
            operation = "create"
            try:
                obj = self._observed.get(name)
                if obj is None:
                    await self._create(name, desired)
                elif not self._matches(obj, desired):
                    operation = "update"
                    await self._update(name, obj, desired)
                if self._desired.get(name) is not desired:
                    continue
                due = self._status_due(name, desired)
                if due <= 0:
                    operation = "status"
                    await self._patch_status(name, desired)
                else:
                    next_due = min(next_due, due)
            except Exception as exc:
                self.metrics.errors.labels(operation=operation).inc()
                failure = failure or exc
        for name, obj in list(self._observed.items()):
            if name in self._desired or not self._is_ours(obj):
                continue
            try:
                await self._delete(name, obj)
            except Exception as exc:
                self.metrics.errors.labels(operation="delete").inc()
                failure = failure or exc
        if failure is not None:
            raise failure
        return next_due

    def _status_due(self, name: str, desired: _Desired) -> float:
        obj = self._observed.get(name)
        if obj is None or not self._matches(obj, desired):
            return math.inf  # not there yet: the create/update wakes us again
        sent = self._status_sent.get(name)
        if sent is None or sent.session_id != desired.session_id:
            return 0.0
        if _counts(desired.refusals) != sent.refused:
            return 0.0  # a new refused peer: its owner hears of it now, not at the next beat
        if desired.heartbeat <= sent.heartbeat:
            return math.inf
        return sent.at + self.heartbeat_interval - time.monotonic()

    async def _create(self, name: str, desired: _Desired) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": desired.labels,
                "ownerReferences": [self._owner()],
            },
            "spec": desired.spec,
        }
        started = time.monotonic()
        try:
            obj = await self._custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body, _request_timeout=self._request_timeout
            )
        except ApiException as exc:
            if exc.status != 409:
                raise
            # Already there: a leftover not (yet) in our view, or another replica's (takeover).
            existing = await self._get(name)
            if existing is not None:
                self._observe(existing)
            self._wake.set()
            return
        self._observe(obj)
        self.metrics.syncs.labels(operation="create").inc()
        log.info(
            "tunnel created",
            tunnel=name,
            session=desired.session_id,
            seconds=round(time.monotonic() - started, 3),
        )

    async def _update(self, name: str, obj: dict[str, Any], desired: _Desired) -> None:
        meta = obj["metadata"]
        patch = {
            "metadata": {
                "resourceVersion": meta["resourceVersion"],  # optimistic concurrency
                "labels": desired.labels,
                "ownerReferences": self._owners_for(obj),
            },
            "spec": merge_patch(obj.get("spec") or {}, desired.spec),
        }
        previous = obj.get("spec") or {}
        try:
            updated = await self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                patch,
                _content_type=MERGE_PATCH,
                _request_timeout=self._request_timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._observed.pop(name, None)
                self._wake.set()
                return
            if exc.status == 409:  # changed under us: read it again, retry next pass
                existing = await self._get(name)
                if existing is not None:
                    self._observe(existing)
                else:
                    self._observed.pop(name, None)
                self._wake.set()
                return
            raise
        self._observe(updated)
        self.metrics.syncs.labels(operation="update").inc()
        log.info(
            "tunnel updated",
            tunnel=name,
            session=desired.session_id,
            replaced_session=previous.get("sessionId"),
            previous_forwarder=(previous.get("forwarder") or {}).get("podName"),
        )

    async def _delete(self, name: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        try:
            await self._custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                body={
                    "preconditions": {
                        "resourceVersion": meta["resourceVersion"],
                        "uid": meta["uid"],
                    }
                },
                _request_timeout=self._request_timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._forget(name, meta["uid"])
                return
            if exc.status == 409:  # changed under us (e.g. taken over): look again
                existing = await self._get(name)
                if existing is not None:
                    self._observe(existing)
                else:
                    self._forget(name, meta["uid"])
                self._wake.set()
                return
            raise
        self._forget(name, meta["uid"])
        self.metrics.syncs.labels(operation="delete").inc()
        log.info("tunnel deleted", tunnel=name, session=(obj.get("spec") or {}).get("sessionId"))

    def _forget(self, name: str, uid: str) -> None:
        current = self._observed.get(name)
        if current is not None and current["metadata"].get("uid") == uid:
            del self._observed[name]
        if name not in self._desired:
            self._status_sent.pop(name, None)

    async def _patch_status(self, name: str, desired: _Desired) -> None:
        heartbeat = desired.heartbeat
        refusals = dict(desired.refusals)
        try:
            obj = await self._custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                name,
                {"status": {"lastHeartbeat": iso_time(heartbeat), **refusals}},
                _content_type=MERGE_PATCH,
                _request_timeout=self._request_timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                self._observed.pop(name, None)
                self._wake.set()
                return
            raise
        self._observe(obj)
        self._status_sent[name] = _StatusSent(
            desired.session_id, heartbeat, time.monotonic(), _counts(refusals)
        )
        self.metrics.syncs.labels(operation="status").inc()
