"""Small helpers over kubernetes_asyncio shared by the reconcile steps.

Everything the reconciler reads is handled as the plain JSON dict the API server sent
(``_preload_content=False``): it is what patches are computed from and what annotations store,
so there is no model <-> camelCase round trip that could drop a field the client's models do not
know (DaskWorkerGroup containers, for one, are only dicts anyway).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from kubernetes_asyncio.client.exceptions import ApiException

Obj = dict[str, Any]

TUNNEL_GROUP = "jobtunnel.io"
TUNNEL_VERSION = "v1alpha1"
TUNNEL_PLURAL = "tunnels"
DASK_GROUP = "kubernetes.dask.org"
DASK_VERSION = "v1"

ROUTED_BY_ANNOTATION = "jobtunnel.io/routed-by"
WORKER_ENV_ANNOTATION = "jobtunnel.io/worker-env"
CLUSTER_LABEL = "dask.org/cluster-name"
COMPONENT_LABEL = "dask.org/component"
WORKERGROUP_LABEL = "dask.org/workergroup-name"

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

CONFLICT_RETRIES = 5


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime | None = None) -> str:
    """Seconds precision, 'Z' suffix: what metav1.Time serialises to."""
    return (moment or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(moment: datetime.datetime | None = None) -> str:
    """metav1.MicroTime (Lease renewTime, Event eventTime)."""
    return (moment or now()).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_of(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


def annotations_of(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def labels_of(obj: Obj) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def json_annotation(obj: Obj, name: str) -> Any:
    """The decoded JSON of an annotation, None when absent or not JSON."""
    raw = annotations_of(obj).get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def status_of(exc: BaseException) -> int | None:
    return exc.status if isinstance(exc, ApiException) else None


def is_not_found(exc: BaseException) -> bool:
    return status_of(exc) == 404


def is_conflict(exc: BaseException) -> bool:
    return status_of(exc) == 409


async def call_json(call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Obj:
    """Run an API call and return the response body as a dict; raise ApiException on >= 300.

    With ``_preload_content=False`` the client returns the raw aiohttp response without
    checking its status, so the check is done here.
    """
    resp = await call(*args, _preload_content=False, **kwargs)
    try:
        data = await resp.read()
        status = int(resp.status)
        reason = str(resp.reason)
    finally:
        resp.release()
    if not 200 <= status <= 299:
        exc = ApiException(status=status, reason=reason)
        exc.body = data.decode(errors="replace")
        raise exc
    if not data:
        return {}
    body = json.loads(data)
    return body if isinstance(body, dict) else {"items": body}


async def get_or_none(call: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Obj | None:
    try:
        return await call_json(call, *args, **kwargs)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def retry_conflicts(
    attempt: Callable[[], Awaitable[bool]], *, retries: int = CONFLICT_RETRIES
) -> bool:
    """Run ``attempt`` (read, compute, patch with resourceVersion) until it does not conflict.

    Each attempt re-reads the object, so a 409 means someone wrote in between and the change
    is recomputed from what they wrote. Returns what the last attempt returned (True: changed).
    """
    for n in range(retries):
        try:
            return await attempt()
        except ApiException as exc:
            if exc.status != 409 or n == retries - 1:
                raise
            await anyio.sleep(0.05 * (n + 1))
    return False  # pragma: no cover - loop always returns or raises


async def patch_json(
    call: Callable[..., Awaitable[Any]],
    *args: Any,
    content_type: str = MERGE_PATCH,
    request_timeout: float | None = None,
) -> Obj:
    """A PATCH with an explicit content type (the client would guess from the body's type)."""
    return await call_json(
        call, *args, _content_type=content_type, _request_timeout=request_timeout
    )
