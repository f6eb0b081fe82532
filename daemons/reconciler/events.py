"""Kubernetes Events a user can see with ``kubectl describe daskcluster <name>``.

Events are written only on transitions (the reconcile step that changes a condition or patches
an object emits; a reconcile that finds everything in place emits nothing), so a resync every few
minutes does not pile up identical Events. They are core/v1 Events (what ``kubectl describe``
shows on 1.20), with the involved object being the DaskCluster and/or the Tunnel. Writing an
Event is best effort: a failure is logged and counted, never fails the reconcile.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from kubernetes_asyncio import client

from daemons.reconciler.kube import (
    DASK_GROUP,
    DASK_VERSION,
    TUNNEL_GROUP,
    TUNNEL_VERSION,
    Obj,
    rfc3339,
)

log = structlog.get_logger(__name__)

COMPONENT = "jobtunnel-reconciler"


@dataclass(frozen=True)
class Ref:
    """An involved object."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        meta = obj.get("metadata") or {}
        return cls(
            str(obj.get("apiVersion", "")),
            str(obj.get("kind", "")),
            str(meta.get("namespace", "")),
            str(meta.get("name", "")),
            str(meta.get("uid", "")),
        )

    @classmethod
    def tunnel(cls, obj: Obj) -> Ref:
        ref = cls.of(obj)
        return Ref(f"{TUNNEL_GROUP}/{TUNNEL_VERSION}", "Tunnel", ref.namespace, ref.name, ref.uid)

    @classmethod
    def dask_cluster(cls, obj: Obj) -> Ref:
        ref = cls.of(obj)
        return Ref(f"{DASK_GROUP}/{DASK_VERSION}", "DaskCluster", ref.namespace, ref.name, ref.uid)


class EventRecorder:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        instance: str,
        on_error: Callable[[], None] | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._instance = instance
        self._on_error = on_error or (lambda: None)
        self._timeout = request_timeout

    async def emit(self, ref: Ref, reason: str, message: str, *, warning: bool = False) -> None:
        now = rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{ref.name}.{secrets.token_hex(8)}",
                "namespace": ref.namespace,
            },
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "namespace": ref.namespace,
                "name": ref.name,
                "uid": ref.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._core.create_namespaced_event(
                ref.namespace,
                body,  # type: ignore[arg-type]
                _request_timeout=self._timeout,
            )
        except Exception as exc:
            self._on_error()
            log.warning(
                "event not recorded",
                involved=f"{ref.kind} {ref.namespace}/{ref.name}",
                reason=reason,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        log.info(
            "event",
            involved=f"{ref.kind} {ref.namespace}/{ref.name}",
            reason=reason,
            message=message,
            type=body["type"],
        )
